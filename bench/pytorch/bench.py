"""The PyTorch + transformers side of kedit's benchmark: the same measurements as `kedit bench`
(host/src/cli/bench.rs) on the same GGUF file, dequantised to f32 by transformers.

* forward: latency of one forward pass over 5 and 64 prompt tokens (the last position's logits,
  no KV cache), median of --repeats runs after one warm-up;
* generation: greedy decoding of 32 new tokens after "The Eiffel Tower is located in" with the
  KV cache (`model.generate`, EOS not stopping it), median of min(repeats, 3) runs; tokens/s is
  new tokens over the whole call, prefill included, as kedit counts it;
* peak_rss_mib: the process's VmHWM, as kedit reads it;
* f32_weight_bytes: 4 bytes per element of every tensor in the GGUF (a tied head is stored
  once), the yardstick both sides' peak RSS is divided by;
* f32_decode_bytes: what one decoding step must read, the same less the input embedding when
  the head is untied (a step reads one embedding row, but the whole head).

Prints JSON in kedit bench's shape (its `evaluation` and `edit` sections have no counterpart
here). Run through run.sh, which provides the virtual environment.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

PROMPT_TEXT = "The quick brown fox jumps over the lazy dog while the Eiffel Tower stands in Paris. "
GENERATION_PROMPT = "The Eiffel Tower is located in"
NEW_TOKENS = 32


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import psutil  # not Linux: the closest portable figure

    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20


def median_of(f, repeats):
    f()  # warm-up, as kedit bench does
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def f32_weight_bytes(path):
    """(all weights, what a decoding step reads), in f32 bytes."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {}
    for t in reader.tensors:
        n = 1
        for d in t.shape:
            n *= int(d)
        sizes[t.name] = n * 4
    total = sum(sizes.values())
    untied_embedding = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0
    return total, total - untied_embedding


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file (`kedit fetch NAME` prints its path)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    path = pathlib.Path(args.model).resolve()
    if not path.is_file() or path.suffix != ".gguf":
        sys.exit(f"bench.py: {path} is not a .gguf file")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    weight_bytes, decode_bytes = f32_weight_bytes(path)

    print("bench.py: loading", path, file=sys.stderr)
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - t
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def ids_of_length(n):
        ids = tokenizer(PROMPT_TEXT * (1 + n // 8), add_special_tokens=True)["input_ids"][:n]
        assert len(ids) == n, f"the prompt gives only {len(ids)} tokens"
        return torch.tensor([ids])

    forward = []
    print("bench.py: forward passes", file=sys.stderr)
    for n in (5, 64):
        ids = ids_of_length(n)

        def run():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        median, times = median_of(run, args.repeats)
        forward.append({"tokens": n, "median_ms": median * 1e3, "min_ms": min(times) * 1e3})

    print("bench.py: generation", file=sys.stderr)
    prompt = torch.tensor([tokenizer(GENERATION_PROMPT, add_special_tokens=True)["input_ids"]])
    generated = 0

    def gen():
        nonlocal generated
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,  # kedit bench does not stop at EOS either
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            )
        generated = out.shape[1] - prompt.shape[1]

    gen_median, _ = median_of(gen, min(args.repeats, 3))

    report = {
        "implementation": "pytorch",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model": {
            "source": str(path),
            "family": model.config.model_type,
            "device": "cpu",
            "load_seconds": load_seconds,
        },
        "threads": torch.get_num_threads(),
        "forward": forward,
        "generation": {
            "new_tokens": generated,
            "median_seconds": gen_median,
            "tokens_per_second": generated / max(gen_median, 1e-9),
        },
        "peak_rss_mib": peak_rss_mib(),
        "f32_weight_bytes": weight_bytes,
        "f32_decode_bytes": decode_bytes,
        "torch_parameter_bytes": param_bytes,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    print(text)


if __name__ == "__main__":
    main()
