#!/usr/bin/env bash
# kedit against PyTorch + transformers on the same GGUF files, one model after the other (never
# both at once, so they do not compete for the cores), then a table of the ratios.
#
#   bench/compare.sh [--repeats N] [MODEL_NAME ...]
#
# MODEL_NAME is a `kedit fetch` name (default: smollm2-135m-instruct
# qwen2.5-coder-0.5b-instruct). Needs `cargo build --release` first (kedit and its plugins);
# the PyTorch side installs itself into target/bench-venv on first use (bench/pytorch/run.sh).
# The JSON of every run lands in target/bench/<timestamp>/; the table goes to stdout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
kedit="$root/target/release/kedit"
repeats=5
models=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --repeats) repeats="$2"; shift 2 ;;
        --repeats=*) repeats="${1#*=}"; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) models+=("$1"); shift ;;
    esac
done
[[ ${#models[@]} -gt 0 ]] || models=(smollm2-135m-instruct qwen2.5-coder-0.5b-instruct)
[[ -x "$kedit" ]] || { echo "compare.sh: $kedit is missing; run cargo build --release" >&2; exit 1; }

out="$root/target/bench/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
for name in "${models[@]}"; do
    path="$("$kedit" fetch "$name")"
    echo "== $name: kedit bench ($path)" >&2
    "$kedit" bench --model "$path" --repeats "$repeats" --out "$out/$name.kedit.json" >/dev/null
    # kedit bench's peak RSS includes its editing and evaluation steps; the peak of plain
    # inference (load + 32 greedy tokens) is what compares with the PyTorch run.
    if [[ -x /usr/bin/time ]]; then
        echo "== $name: kedit generate (inference-only peak RSS)" >&2
        /usr/bin/time -f '%M' -o "$out/$name.kedit-generate.maxrss-kib" \
            "$kedit" generate --model "$path" --prompt "The Eiffel Tower is located in" \
            --max-new-tokens 32 >/dev/null
    fi
    echo "== $name: PyTorch" >&2
    "$root/bench/pytorch/run.sh" --model "$path" --repeats "$repeats" \
        --out "$out/$name.torch.json" >/dev/null
done
python3 "$root/bench/table.py" "$out" "${models[@]}" | tee "$out/table.txt"
echo "(JSON in $out)" >&2
