#!/usr/bin/env bash
# docs/results.md for smollm2-135m: every sweep, evaluation and benchmark the report needs, then the
# report itself. Run from a fresh clone as:  benchmarks/results.sh
# Steps whose output exists are skipped and sweeps resume point by point, so an interrupted run
# continues. The evaluations are those of benchmarks/eval_suite.sh (docs/evaluation-results.md);
# about 6 CPU-hours on two cores in all.
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
R=runs/results
mkdir -p "$R" runs/bench
M=smollm2-135m
# Sweeps: 3 compression rates beyond the dense point, perplexity on the first 2 WikiText-2 test
# windows, 16 calibration windows per point: the budget that fits the curves into a few CPU-hours.
SWEEP=(--rates 0,0.25,0.5,1 --tasks wikitext2 --limit 2 --calib-samples 16)
FPP=(--rates 0,0.5,1 --tasks wikitext2 --limit 2 --calib-samples 16)  # FPP points cost the most
sp sweep $M --method irc --variants q,k,qk "${SWEEP[@]}" --json $R/sweep-irc.json              # Fig. 10
sp sweep $M --method dwc --variants lower,upper,both "${SWEEP[@]}" --json $R/sweep-dwc.json    # Fig. 11
sp sweep $M --method irc+dwc --variants ablation "${SWEEP[@]}" --json $R/sweep-ablation.json  # Fig. 16
sp sweep $M --method fpp-emb "${FPP[@]}" --json $R/sweep-fpp-emb.json                        # Fig. 14
sp sweep $M --method fpp-ff "${FPP[@]}" --json $R/sweep-fpp-ff.json                          # Fig. 15
benchmarks/eval_suite.sh
[ -f runs/paper-model-bfloat16/smartprune.json ] || sp compress $M --recipe paper --dtype bfloat16 \
  --out runs/paper-model-bfloat16
[ -f runs/paper-structured-model/smartprune.json ] || sp compress $M --recipe paper-structured \
  --out runs/paper-structured-model
# compress writes float32 values by default: the fp32 artifact is runs/paper-model itself.
[ -e runs/paper-model-float32 ] || ln -s paper-model runs/paper-model-float32
[ -f runs/bench/bench.json ] || sp bench $M runs/paper-model-float32 runs/paper-model-bfloat16 \
  runs/paper-structured-model --repeats 3 --threads 1 --json runs/bench/bench.json
E=runs/eval
sp report runs/paper-model $E/ppl-full.json $E/zero-shot.json $E/finetune.json $E/classify-sst2.json \
  runs/bench/bench.json $R/sweep-irc.json $R/sweep-dwc.json $R/sweep-ablation.json $R/sweep-fpp-emb.json \
  $R/sweep-fpp-ff.json --out $R/report --overwrite
rm -rf docs/results && mkdir -p docs/results
cp -r $R/report/figures docs/results/figures
sed 's#](figures/#](results/figures/#g' $R/report/report.md > docs/results.md
echo "wrote docs/results.md and docs/results/figures/"
