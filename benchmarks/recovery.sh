#!/usr/bin/env bash
# docs/recovery-results.md on this machine's CPU: what the demo's recovery budget buys, and every
# method retrained with one equal budget (compare --recover-tokens). Steps whose JSON exists are
# skipped. Pass a device to run the comparison on a GPU: benchmarks/recovery.sh cuda
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
R=runs/recovery
DEVICE=${1:-auto}
mkdir -p "$R"
[ -f $R/demo-quick.json ] || sp demo --quick --device "$DEVICE" --json $R/demo-quick.json
[ -f $R/demo-full.json ] || sp demo --device "$DEVICE" --json $R/demo-full.json
# Equal size (match:paper) and equal retraining for every row; the dense fine-tuned row is the reference.
[ -f $R/compare.json ] || sp compare smollm2-135m --device "$DEVICE" \
  --methods dense,paper,paper-30,benchmarks/recipes/paper-irc-output.yaml,magnitude,wanda,sparsegpt \
  --sparsity 0.5,match:paper --tasks wikitext2,ptb --limit 4 --recover-tokens 10240 --json $R/compare.json
