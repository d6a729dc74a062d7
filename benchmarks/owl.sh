#!/usr/bin/env bash
# docs/smart-results.md, "Against OWL": smart (embedding + block linears allocated), the allocation over
# the block linears alone, OWL-SparseGPT, OWL-Wanda and uniform SparseGPT at the size of 70% (then 50%)
# of SmolLM2-135M's block linears, one calibration set, before and after an equal retraining.
# Steps whose JSON exists are skipped. Pass a device to run on a GPU: benchmarks/owl.sh cuda
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
R=runs/owl
B=benchmarks/recipes
DEVICE=${1:-auto}
mkdir -p "$R"
[ -f $R/owl70.json ] || sp compare smollm2-135m --device "$DEVICE" --limit 32 --recover-tokens 10240 \
  --methods dense,$B/smart-bl70.yaml,$B/smart-bl70-blocks.yaml,owl-sparsegpt,owl-wanda,sparsegpt \
  --sparsity match:$B/smart-bl70.yaml --json $R/owl70.json
[ -f $R/owl50.json ] || sp compare smollm2-135m --device "$DEVICE" --limit 32 --recover-tokens 10240 \
  --methods $B/smart-bl50.yaml,$B/smart-bl50-blocks.yaml,owl-sparsegpt,owl-wanda,sparsegpt \
  --sparsity match:$B/smart-bl50.yaml --json $R/owl50.json
