#!/usr/bin/env bash
# docs/results.md for smollm2-135m: every sweep, evaluation and benchmark the report needs, then the
# report itself. Run from a fresh clone (after ./run setup) as:  benchmarks/results.sh
# Each step writes its JSON under runs/results/ and is skipped when that file is complete; sweeps
# resume point by point. Several hours on two CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
sp() { ./run smartprune -q "$@"; }
R=runs/results
mkdir -p "$R"
M=smollm2-135m
SWEEP=(--rates 0,0.25,0.5,0.75,1 --tasks wikitext2 --limit 4)
[ -f $R/paper/smartprune.json ] || sp compress $M --recipe paper --out $R/paper
[ -f $R/paper-structured/smartprune.json ] || sp compress $M --recipe paper-structured --out $R/paper-structured
sp sweep $M --method irc --variants q,k,qk "${SWEEP[@]}" --json $R/sweep-irc.json              # Fig. 10
sp sweep $M --method dwc --variants lower,upper,both "${SWEEP[@]}" --json $R/sweep-dwc.json    # Fig. 11
sp sweep $M --method irc+dwc --variants ablation "${SWEEP[@]}" --json $R/sweep-ablation.json  # Fig. 13/16
sp sweep $M --method fpp-emb "${SWEEP[@]}" --json $R/sweep-fpp-emb.json                        # Fig. 14
sp sweep $M --method fpp-ff "${SWEEP[@]}" --json $R/sweep-fpp-ff.json                          # Fig. 15
[ -f $R/eval.json ] || sp eval $M $R/paper $R/paper-structured --tasks wikitext2,wikitext103,ptb,sst2,sms \
  --limit 16 --examples 500 --json $R/eval.json
[ -f $R/classify.json ] || sp classify $M --task sst2 --recipe paper --max-train 500 --examples 500 --json $R/classify.json
[ -f $R/bench.json ] || sp bench $M $R/paper $R/paper-structured --repeats 3 --json $R/bench.json
sp report $R/paper $R/eval.json $R/classify.json $R/bench.json $R/sweep-*.json --out $R/report --overwrite
rm -rf docs/results && mkdir -p docs/results
cp -r $R/report/figures docs/results/figures
sed 's#](figures/#](results/figures/#g' $R/report/report.md > docs/results.md
echo "wrote docs/results.md and docs/results/figures/"
