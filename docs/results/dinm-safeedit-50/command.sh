#!/bin/sh
# Run from the repository root after `cargo build --release`; about 2 hours on 2 cores.
exec nice -n 5 target/release/kedit eval --model smollm2-135m-instruct --method dinm \
  --data ../shared/data/safeedit/safeedit_sample.json --format safeedit --limit 50 \
  --judge rules --judge model:smollm2-135m-instruct --max-new-tokens 64 \
  --ppl-corpus ../shared/data/corpus/wiki_vital_en_extracts.txt --ppl-docs 8 --ppl-max-tokens 128 \
  --out dinm-se50
