"""A same-run PyTorch reference for the cost of one editing step, as EasyEdit computes it.

EasyEdit itself is not installed here; this script performs the same work per step on the same
GGUF model (dequantised to f32 by transformers, all cores), so that `kedit bench`'s step times
can be put against a reference measured on the same machine in the same session:

* rome: one v* step of ROME at EasyEdit's LLaMA settings (`hparams/ROME/llama-7b.yaml`, METHODS.md
  §3): the request expanded over 21 context templates (`{}` and 20 model-sampled prefixes of 5 and
  10 tokens, each followed by ". {}"), every row `template.format(prompt) + target[:-1]`, plus the
  KL row "{subject} is a"; a whole-network forward of the right-padded batch with δ added to the
  MLP output of the edit layer at each row's last subject token, the NLL of the target tokens
  averaged per row, the KL of the KL row against its first-step distribution, the weight decay,
  backward to δ only (every weight frozen) and one Adam step;
* wise: one WISE iteration at EasyEdit's settings (`hparams/WISE/llama-7b.yaml`, METHODS.md §4):
  11 rows `template.format(prompt + " " + target)` (`{}` and greedy continuations of five prefixes,
  5 and 10 tokens) plus one irrelevant row, left-padded; a whole-network forward with the side
  copy of the edit layer's MLP output map in place of the original (the original's output
  computed as well, for the routing scores), the label-masked NLL, the three-part margin on the
  activation scores, backward to the side copy only, the masked SGD step and the clamp around the
  original weights.

Timing: one warm-up step, then the median of --repeats steps. The step counts per edit are
kedit's business (early stopping is the same algorithm on both sides); only the time of one step
is compared. Prints JSON; run through run.sh's environment:

    target/bench-venv/bin/python bench/pytorch/edit_steps.py --model GGUF [--repeats N]
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROME_PREFIXES = ["The", "Therefore", "Because", "I", "You"]
WISE_PREFIXES = ["I", "You", "Because", "Yes", "Q: "]
# The second request `kedit bench` edits (host/src/cli/bench.rs), with its locality prompt as
# WISE's irrelevant row, as kedit takes it when no irrelevant file is given.
ROME_REQUEST = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target": "English",
}
WISE_REQUEST = {
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target": "English",
    "irrelevant": "The mother tongue of Léon Blum is French",
}


def timed(step, repeats):
    step()  # warm-up
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def timed_with_hook(step, handle, repeats, shape, unit):
    """Times `step`, removes the model hook `handle`, and returns `shape` with the times."""
    try:
        median, times = timed(step, repeats)
    finally:
        handle.remove()
    return {**shape, f"median_{unit}_seconds": median, f"{unit}_seconds": times}


def load(path, torch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def log(msg):
    print(f"edit_steps: {msg}", file=sys.stderr, flush=True)


def rome_step(tok, model, torch, layer, repeats):
    log("rome: generating the context templates")
    torch.manual_seed(0)
    templates = ["{}"]
    for length in (5, 10):
        for prefix in ROME_PREFIXES:
            ids = tok(prefix, return_tensors="pt").input_ids
            out = model.generate(
                ids.repeat(2, 1),
                do_sample=True,
                top_k=5,
                max_new_tokens=max(length - ids.shape[1], 1),
                pad_token_id=tok.eos_token_id,
            )
            for row in out:
                text = tok.decode(row, skip_special_tokens=True).replace("{", "").replace("}", "")
                templates.append(text + ". {}")
    req = ROME_REQUEST
    target = tok(" " + req["target"], add_special_tokens=False).input_ids
    prompt = req["prompt"].format(req["subject"])
    texts = [t.format(prompt) + tok.decode(target[:-1]) for t in templates]
    kl_text = "{} is a".format(req["subject"])
    rows = [tok(t).input_ids for t in texts] + [tok(kl_text).input_ids]
    # The last subject token of every row: the tokens of the text up to the subject's end, as
    # ROME finds it.
    lookup = []
    for t in texts + [kl_text]:
        end = t.rindex(req["subject"]) + len(req["subject"])
        lookup.append(len(tok(t[:end]).input_ids) - 1)
    n_edit = len(texts)
    # Target positions: the last len(target) tokens of each edit row predict the target.
    targets = []
    for b, r in enumerate(rows[:n_edit]):
        start = len(r) - (len(target) - 1)
        targets.append([(b, start - 1 + j, target[j]) for j in range(len(target))])
    return time_rome_rows(tok, model, torch, layer, rows, lookup, targets, repeats)


def time_rome_rows(tok, model, torch, layer, rows, lookup, targets, repeats):
    """Times one v* step on `rows` (token ids; the edit rows, then the KL row last): δ added at
    each row's `lookup` position, NLL at `targets` (per edit row, (row, position, token)
    triples), right-padded as EasyEdit pads."""
    n_edit = len(targets)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    d = model.config.hidden_size
    delta = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.5)
    mlp = model.model.layers[layer].mlp

    def hook(_module, _inputs, output):
        out = output.clone()
        for b, p in enumerate(lookup):
            out[b, p, :] = out[b, p, :] + delta
        return out

    handle = mlp.register_forward_hook(hook)
    kl_init = None
    log(f"rome: {len(rows)} rows of {width} tokens, timing steps")

    def step():
        nonlocal kl_init
        opt.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits, dim=-1)
        nll = torch.stack(
            [-torch.stack([logp[b, p, t] for (b, p, t) in row]).mean() for row in targets]
        ).mean()
        kl_row = logp[n_edit, len(rows[n_edit]) - 1]
        if kl_init is None:
            kl_init = kl_row.detach().clone()
        kl = 0.0625 * torch.nn.functional.kl_div(kl_init, kl_row, log_target=True, reduction="batchmean")
        decay = 0.5 * delta.norm() / (delta.detach().norm() + 1.0)
        (nll + kl + decay).backward()
        opt.step()

    return timed_with_hook(step, handle, repeats, {"rows": len(rows), "padded_len": width, "edit_layer": layer}, "step")


def rome_replay(tok, model, torch, reports, repeats):
    """Times one v* step on each ROME edit of a `kedit bench --reports` file, on the very rows
    kedit optimised (its report's `rows_text`, subject positions, label positions and target
    ids), and puts the step counts kedit's early stop took against them: the reference's edit is
    those steps at its step time (EasyEdit's own per-edit overhead not counted)."""
    edits = []
    for n, line in enumerate(pathlib.Path(reports).read_text().splitlines(), 1):
        rec = json.loads(line)
        if rec.get("method") != "rome":
            continue
        for entry in rec["details"]["layers"]:
            # kedit's rows carry no BOS; the tokenizer transformers builds from the GGUF adds one.
            rows = [tok(t, add_special_tokens=False).input_ids for t in entry["rows_text"]]
            labels, target = entry["label_positions"], entry["target_ids"]
            for b, positions in enumerate(labels):
                if positions[-1] != len(rows[b]) - 1 or len(positions) != len(target):
                    sys.exit(
                        f"edit_steps.py: {reports} line {n}, row {b}: kedit's label positions "
                        f"{positions} do not fit the {len(rows[b])} tokens this tokenizer makes"
                    )
            targets = [[(b, p, target[j]) for j, p in enumerate(ps)] for b, ps in enumerate(labels)]
            log(f"rome replay: request {rec['request']}")
            timing = time_rome_rows(
                tok, model, torch, entry["layer"], rows, entry["subject_last_index_per_row"], targets, repeats
            )
            steps = [s["seconds"] for s in entry["steps"]]
            edits.append(
                {
                    "request": rec["request"],
                    **timing,
                    "kedit_steps": len(steps),
                    "kedit_median_step_seconds": statistics.median(steps),
                    "kedit_edit_seconds": rec["seconds"],
                    "reference_edit_seconds": len(steps) * timing["median_step_seconds"],
                }
            )
    if not edits:
        sys.exit(f"edit_steps.py: {reports} holds no ROME edit")

    def ratio(key_ref, key_kedit):
        return statistics.median(e[key_ref] / e[key_kedit] for e in edits)

    return {
        "edits": edits,
        "median_step_ratio": ratio("median_step_seconds", "kedit_median_step_seconds"),
        "median_edit_ratio": ratio("reference_edit_seconds", "kedit_edit_seconds"),
        "total_edit_ratio": sum(e["reference_edit_seconds"] for e in edits)
        / sum(e["kedit_edit_seconds"] for e in edits),
        "median_kedit_edit_seconds": statistics.median(e["kedit_edit_seconds"] for e in edits),
        "median_reference_edit_seconds": statistics.median(e["reference_edit_seconds"] for e in edits),
    }


def wise_step(tok, model, torch, layer, repeats):
    log("wise: generating the context templates")
    templates = ["{}"]
    for length in (5, 10):
        for prefix in WISE_PREFIXES:
            ids = tok(prefix, return_tensors="pt").input_ids
            out = model.generate(ids, do_sample=False, num_beams=1, max_new_tokens=length, pad_token_id=tok.eos_token_id)
            templates.append(tok.decode(out[0], skip_special_tokens=True) + " {}")
    req = WISE_REQUEST
    texts = [t.format(req["prompt"] + " " + req["target"]) for t in templates] + [req["irrelevant"]]
    rows = [tok(t).input_ids for t in texts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    n_target = len(tok(" " + req["target"], add_special_tokens=False).input_ids)
    labels = torch.full_like(ids, -100)
    for b in range(len(rows) - 1):
        labels[b, width - n_target :] = ids[b, width - n_target :]
    down = model.model.layers[layer].mlp.down_proj
    original = down.weight.detach().clone()
    side = torch.nn.Parameter(original.clone())
    grad_mask = (torch.rand_like(original) < 0.2).float()
    seen = {}

    def forward_hook(_module, inputs, _output):
        x = inputs[0]
        seen["original"] = x @ original.T
        seen["side"] = x @ side.T
        return seen["side"]

    handle = down.register_forward_hook(forward_hook)
    alpha, beta, gamma = 5.0, 20.0, 10.0
    log(f"wise: {len(rows)} rows of {width} tokens, timing iterations")

    def step():
        if side.grad is not None:
            side.grad = None
        logits = model(input_ids=ids, attention_mask=mask).logits
        shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
        ft = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        dist = (seen["side"] - seen["original"]).norm(dim=-1).mean(dim=-1)
        ins, out = dist[:-1], dist[-1]

        def pos_mean(v):
            v = v[v > 0]
            return v.mean() if v.numel() else torch.zeros(())

        act = pos_mean(out - ins + gamma) + torch.relu(out - alpha) + pos_mean(beta - ins)
        (ft + act).backward()
        with torch.no_grad():
            side.grad.mul_(grad_mask)
            side.add_(side.grad, alpha=-1.0)
            side.copy_(torch.clamp(side, original - 1.0, original + 1.0))

    return timed_with_hook(step, handle, repeats, {"rows": len(rows), "padded_len": width, "edit_layer": layer}, "iteration")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file (`kedit fetch NAME` prints its path)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per method (the median is reported)")
    ap.add_argument("--rome-layer", type=int, default=5, help="ROME's edit layer (EasyEdit's LLaMA files: 5)")
    ap.add_argument("--wise-layer", type=int, default=27, help="WISE's layer (EasyEdit's LLaMA files: 27)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument(
        "--kedit-reports",
        help="a `kedit bench --reports` file: time ROME's step on each of its edits' rows instead "
        "of the built-in request (and skip WISE)",
    )
    args = ap.parse_args()
    path = pathlib.Path(args.model).resolve()
    if not path.is_file() or path.suffix != ".gguf":
        sys.exit(f"edit_steps.py: {path} is not a .gguf file")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    tok, model = load(path, torch)
    cpu0 = time.process_time()
    result = {
        "implementation": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "model": str(path),
    }
    if args.kedit_reports:
        result["rome_replay"] = rome_replay(tok, model, torch, args.kedit_reports, args.repeats)
    else:
        result["rome"] = rome_step(tok, model, torch, args.rome_layer, args.repeats)
        result["wise"] = wise_step(tok, model, torch, args.wise_layer, args.repeats)
    result["process_cpu_seconds"] = time.process_time() - cpu0
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
