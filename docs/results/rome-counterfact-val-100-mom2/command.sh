kedit eval --model smollm2-135m-instruct --method rome --hparams hparams.toml --data ../shared/data/counterfact/counterfact-val.json --limit 100 --protocol single --out OUT
# hparams.toml: mom2_adjustment = true (the ROME paper's u = C⁻¹k̄); C over the whole corpus
# (mom2_n_samples 100000 > its 10,033 documents). The first edit (528 s) includes computing C for
# layer 5 (then cached); the run shared the machine with other jobs at times, so edit times are
# not speed figures (see docs/results/bench-2026-11-29-blas).
