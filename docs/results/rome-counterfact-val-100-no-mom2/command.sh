kedit eval --model smollm2-135m-instruct --method rome --data ../shared/data/counterfact/counterfact-val.json --limit 100 --protocol single --out OUT   # kedit's ROME default: mom2_adjustment = false (EasyEdit's)
# Run 2026-11-29 (commit 0ef6690's plugins) on a 2-core machine shared with builds, a CI run and
# benchmarks: the edit times in report.md measure that load, not kedit's speed (see
# docs/results/bench-2026-11-29-blas for an idle measurement).
