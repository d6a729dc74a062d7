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
# the same profile with glibc returning blocks of 1 MiB and more to the system at once (not set by smartprune)
[ -f $R/memory-mmap/memory.json ] || MALLOC_MMAP_THRESHOLD_=1048576 $PY benchmarks/memory_profile.py smollm2-135m \
  $R/paper $R/paper-int8 --resident compact --out $R/memory-mmap
[ -f $R/eval-lowrank.json ] || sp eval $R/paper-structured-lowrank $R/paper-structured --tasks wikitext2 --limit 8 \
  --json $R/eval-lowrank.json
# what the 2:4 pattern costs FPP against the same 50% unstructured (quality only: the speed needs a GPU)
[ -f $R/ff24-compare.json ] || sp compare smollm2-135m --limit 4 --json $R/ff24-compare.json \
  --methods dense,benchmarks/recipes/ff-2of4.yaml,benchmarks/recipes/ff-50.yaml
