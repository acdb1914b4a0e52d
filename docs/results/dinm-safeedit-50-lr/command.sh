#!/bin/sh
# Run from the repository root after `cargo build --release`; about 1.5 hours on 2 cores.
# The default hparams derive DINM's learning rate from the MLP width (docs/dinm.md); on
# SmolLM2-135M that is 5e-4 · 11008 / 1536. The run was made with the value given explicitly
# (`lr = 0.0035833333333333338`, the same f64), by binaries built before the default changed.
exec nice -n 5 target/release/kedit eval --model smollm2-135m-instruct --method dinm \
  --data ../shared/data/safeedit/safeedit_sample.json --format safeedit --limit 50 \
  --judge rules --judge model:smollm2-135m-instruct --max-new-tokens 64 \
  --ppl-corpus ../shared/data/corpus/wiki_vital_en_extracts.txt --ppl-docs 8 --ppl-max-tokens 128 \
  --out dinm-se50-lr
