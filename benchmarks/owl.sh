#!/usr/bin/env bash
# docs/smart-results.md, "Against OWL": smart (embedding + block linears allocated), the allocation over
# the block linears alone (sensitivity scored by Wanda's criterion, and by SparseGPT's own pruning),
# OWL-SparseGPT, OWL-Wanda and uniform SparseGPT at the size of 70% (then 50%) of SmolLM2-135M's block
# linears, one calibration set, 32 windows of WikiText-2 and PTB, before and after an equal retraining.
# Not quiet: each row's perplexities are logged as it finishes (the JSON is written at the end).
# Steps whose JSON exists are skipped. Pass a device to run on a GPU: benchmarks/owl.sh cuda
set -euo pipefail
cd "$(dirname "$0")/.."
R=runs/owl
B=benchmarks/recipes
DEVICE=${1:-auto}
mkdir -p "$R"
for size in 70 50; do
  [ -f "$R/owl$size.json" ] && continue
  rows=$B/smart-bl$size.yaml,$B/smart-bl$size-blocks.yaml,$B/smart-bl$size-blocks-stage.yaml
  [ "$size" = 70 ] && rows=dense,$rows  # the dense rows once
  ./run smartprune compare smollm2-135m --device "$DEVICE" --limit 32 --recover-tokens 10240 \
    --methods "$rows,owl-sparsegpt,owl-wanda,sparsegpt" --sparsity "match:$B/smart-bl$size.yaml" \
    --json "$R/owl$size.json" 2>&1 | tee "$R/owl$size-log.txt"
done
