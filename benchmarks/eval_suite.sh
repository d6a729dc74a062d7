#!/usr/bin/env bash
# The evaluation-suite measurements of docs/evaluation-results.md: smollm2-135m dense and after the
# `paper` recipe. Writes JSON (and logs) to runs/eval/. Several hours on two CPU cores; each step can
# be run on its own by copying its line.
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
mkdir -p runs/eval
TASKS=cola,sst2,mrpc,rte,qnli,mnli,sms,qqp
[ -f runs/paper-model/smartprune.json ] || sp compress smollm2-135m --recipe paper --out runs/paper-model
step() { local name=$1; shift; local t0=$SECONDS; "$@" > "runs/eval/$name.txt"; echo "$name: $((SECONDS - t0)) s"; }
step ppl-full sp eval smollm2-135m runs/paper-model --tasks wikitext2,wikitext103,ptb --json runs/eval/ppl-full.json
step zero-shot sp eval smollm2-135m runs/paper-model --tasks $TASKS --examples 1000 --json runs/eval/zero-shot.json
step generation sp generate smollm2-135m runs/paper-model --json runs/eval/generation.json
step generation-sample sp generate smollm2-135m runs/paper-model --sample --json runs/eval/generation-sample.json
step finetune sp eval smollm2-135m runs/paper-model --tasks $TASKS --mode finetune --max-train 300 --epochs 1 \
  --examples 300 --json runs/eval/finetune.json
step classify-sst2 sp classify smollm2-135m --task sst2 --recipe paper --max-train 300 --examples 300 \
  --calib-samples 32 --json runs/eval/classify-sst2.json
step train-gpt2-mini sp train --config gpt2-mini --steps 1000 --minutes 5 --out runs/gpt2-mini --overwrite
