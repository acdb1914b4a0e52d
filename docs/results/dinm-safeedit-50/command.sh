#!/bin/sh
cd /work/wt-safeedit
exec nice -n 10 target/release/kedit eval --model smollm2-135m-instruct --method dinm \
  --data /work/shared/data/safeedit/safeedit_sample.json --format safeedit --limit 50 \
  --judge rules --judge model:smollm2-135m-instruct --max-new-tokens 64 \
  --ppl-corpus /work/shared/data/corpus/wiki_vital_en_extracts.txt --ppl-docs 8 --ppl-max-tokens 128 \
  --out /tmp/dinm-se50
