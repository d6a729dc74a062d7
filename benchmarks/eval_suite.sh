#!/usr/bin/env bash
# The evaluation-suite measurements of docs/evaluation-results.md: smollm2-135m dense and after the
# `paper` recipe. Writes JSON (and the printed tables) to runs/eval/. A step whose JSON exists is
# skipped, so an interrupted run continues where it stopped. About 3 CPU-hours on two cores; each
# step can be run on its own by copying its line.
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
mkdir -p runs/eval
TASKS=cola,sst2,mrpc,rte,qnli,mnli,sms,qqp
[ -f runs/paper-model/smartprune.json ] || sp compress smollm2-135m --recipe paper --out runs/paper-model
step() {
  local name=$1; shift
  [ -f "runs/eval/$name.json" ] && { echo "$name: done (runs/eval/$name.json)"; return; }
  local t0=$SECONDS
  "$@" --json "runs/eval/$name.json" > "runs/eval/$name.txt"
  echo "$name: $((SECONDS - t0)) s"
}
step ppl-full sp eval smollm2-135m runs/paper-model --tasks wikitext2,wikitext103,ptb
step zero-shot sp eval smollm2-135m runs/paper-model --tasks $TASKS --examples 500
step generation sp generate smollm2-135m runs/paper-model
step generation-sample sp generate smollm2-135m runs/paper-model --sample
step finetune sp eval smollm2-135m runs/paper-model --tasks $TASKS --mode finetune --max-train 300 --epochs 1 \
  --examples 300
step classify-sst2 sp classify smollm2-135m --task sst2 --recipe paper --max-train 300 --examples 300 \
  --calib-samples 32
[ -f runs/gpt2-mini/config.json ] || sp train --config gpt2-mini --steps 1000 --minutes 5 --out runs/gpt2-mini \
  --overwrite > runs/eval/train-gpt2-mini.txt
