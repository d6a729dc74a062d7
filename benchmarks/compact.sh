#!/usr/bin/env bash
# docs/compact-results.md: the compressed SmolLM2-135M folders (paper, its 8-bit copy, paper-structured,
# paper-structured with a rank-128 head), `bench` of all of them in both residencies beside the dense
# model, the quality of stored dtypes and head options (compact_quality.py), and where the memory of
# load + one forward goes (memory_profile.py). Steps whose output exists are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
PY=.venv/bin/python
R=runs/compact
mkdir -p "$R"
[ -d $R/paper ] || sp compress smollm2-135m --recipe paper --out $R/paper
[ -d $R/paper-structured ] || sp compress smollm2-135m --recipe paper-structured --out $R/paper-structured
[ -d $R/paper-structured-lowrank ] || sp compress smollm2-135m --out $R/paper-structured-lowrank \
  --recipe benchmarks/recipes/paper-structured-lowrank128.yaml
# the same `paper` model with its values stored in bfloat16 and as 8-bit integers (what `compress --dtype` writes)
for dt in bfloat16 int8; do
  [ -d $R/paper-$dt ] || $PY -c "import smartprune, transformers; d = '$R/paper'; smartprune.save(smartprune.load(d, \
    structured=False), '$R/paper-$dt', dtype='$dt', tokenizer=transformers.AutoTokenizer.from_pretrained(d))"
done
[ -f $R/bench.json ] || sp bench smollm2-135m $R/paper $R/paper-int8 $R/paper-structured $R/paper-structured-lowrank \
  --repeats 3 --threads 1 --json $R/bench.json
[ -f $R/memory/memory.json ] || $PY benchmarks/memory_profile.py smollm2-135m $R/paper $R/paper-bfloat16 $R/paper-int8 \
  --out $R/memory
[ -f $R/quality/quality.json ] || $PY benchmarks/compact_quality.py smollm2-135m $R/paper $R/paper-structured \
  --threads 1 --out $R/quality
