#!/usr/bin/env bash
# Runs bench.py (the PyTorch + transformers side of the benchmark) in its own virtual
# environment under target/bench-venv, creating it on first use. Arguments go to bench.py.
#
# CPU-only torch comes from PyTorch's CPU wheel index; where that index is unreachable (or
# KEDIT_BENCH_TORCH_INDEX is set empty) `torch` comes from PyPI instead, which pulls the CUDA
# wheels (several GB) but runs the same CPU kernels.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${KEDIT_BENCH_VENV:-$root/target/bench-venv}"
index="${KEDIT_BENCH_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
# The versions the issue names as the reference (PyTorch 2.9, transformers 5.5).
torch_spec="${KEDIT_BENCH_TORCH:-torch==2.9.*}"
tf_spec="${KEDIT_BENCH_TRANSFORMERS:-transformers==5.5.*}"

if [[ ! -x "$venv/bin/python" || ! -f "$venv/.kedit-bench-ready" ]]; then
    echo "bench: creating $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    if [[ -z "$index" ]] \
        || ! "$venv/bin/python" -m pip install --quiet --retries 1 --timeout 20 \
            "$torch_spec" --index-url "$index" >&2; then
        echo "bench: CPU wheel index ${index:-(none)} not usable; installing torch from PyPI" >&2
        "$venv/bin/python" -m pip install --quiet "$torch_spec" >&2
    fi
    "$venv/bin/python" -m pip install --quiet "$tf_spec" accelerate safetensors gguf psutil >&2
    touch "$venv/.kedit-bench-ready"
    du -sh "$venv" >&2
fi
exec "$venv/bin/python" "$root/bench/pytorch/bench.py" "$@"
