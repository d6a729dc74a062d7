#!/usr/bin/env bash
# docs/smart-results.md: the FPP criteria alone (embedding, feed-forward at 70%, no re-fitting), and
# the allocated `smart` recipes beside SparseGPT, Wanda and `paper` at equal size, before and after an
# equal retraining (compare --recover-tokens). Steps whose JSON exists are skipped. Pass a device to
# run on a GPU: benchmarks/smart.sh cuda
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
R=runs/smart
C=benchmarks/recipes/criteria
DEVICE=${1:-auto}
mkdir -p "$R"
[ -f $R/criteria.json ] || sp compare smollm2-135m --device "$DEVICE" --limit 4 --json $R/criteria.json \
  --methods dense,$C/emb70-magnitude.yaml,$C/emb70-frequency.yaml,$C/ff70-magnitude.yaml,$C/ff70-wanda.yaml,$C/ff70-obs.yaml
[ -f $R/baseline.json ] || sp compare smollm2-135m --device "$DEVICE" --limit 4 --json $R/baseline.json \
  --methods sparsegpt,benchmarks/recipes/emb70-sparsegpt.yaml --sparsity 0.8676
[ -f $R/smart68.json ] || sp compare smollm2-135m --device "$DEVICE" --limit 4 --recover-tokens 10240 \
  --methods dense,smart,sparsegpt,wanda,paper --sparsity match:smart --json $R/smart68.json
[ -f $R/smart50.json ] || sp compare smollm2-135m --device "$DEVICE" --limit 4 --recover-tokens 10240 \
  --methods smart-50,sparsegpt,wanda --sparsity match:smart-50 --json $R/smart50.json
