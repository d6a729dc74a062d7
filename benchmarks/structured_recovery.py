"""Recovery settings for a structured model at the demo's budgets, each timed alone: which spends the CPU
best. `slim-40` (compensated, the built-in) of SmolLM2-135M is compressed once; then each variant of the
demo's quick or full budget (a change of the recovery config: learning rate, warm-up, objective, ...)
retrains it from the compressed model, and is scored on WikiText-2 and PTB test.

    python benchmarks/structured_recovery.py --out runs/srec                       # every variant
    python benchmarks/structured_recovery.py --out runs/srec --variants full full-lr3e-4
    python benchmarks/structured_recovery.py --out runs/srec-gemma --model gemma3-270m --recipe slim-25 \
        --variants quick demo-full

Every step is cached in --out (re-running resumes; a variant is one folder; one --out per dense model,
whose scores it caches). Results:
``recovery-RECIPE.json`` and ``.md`` in --out. Run it alone on the machine: the recovery seconds are
the comparison (quality per CPU-minute), so a second job beside it makes them meaningless.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import MODEL, QUICK_END_TO_END, cached, ppl  # beside this file: the benchmarks' shared helpers

from smartprune.files import read_json, write_results
from smartprune.recipes.schema import RECOVERY_BUDGETS, RecoverConfig
from smartprune.runs.compress import compress_model
from smartprune.runs.recover import recover_model

TASKS = ("wikitext2", "ptb")

# The bases the variants change: the quick and full budgets as they were until 2026-12-07 (end-to-end, lr 1e-3
# throughout) and as the demo runs them now (RECOVERY_BUDGETS: block fits first where the shapes changed, then
# lr 3e-4; on a structured model full is the same run as full-blockwise-lr3e-4, quick as quick-fits16).
BASES = {"quick": QUICK_END_TO_END,
         "demo-quick": RECOVERY_BUDGETS["quick"],
         "full": {**RECOVERY_BUDGETS["full"], "objective": "end_to_end", "lr_after_fits": None},
         "demo-full": RECOVERY_BUDGETS["full"]}

# name -> (base, changes to it)
VARIANTS: dict[str, tuple[str, dict]] = {
    "demo-full": ("demo-full", {}),
    # the full budget of 2026-12-07 (32 fit steps per block on 64 cached windows), before the longer fits
    "demo-full-fits32": ("demo-full", {"block_steps": 32, "cache_windows": 64}),
    "demo-quick": ("demo-quick", {}),
    "quick": ("quick", {}),
    "quick-warm": ("quick", {"warmup": 0.25}),
    # short block fits before the quick budget's 8 steps (windows of 128, as its steps), then the full budget's lr
    "quick-fits8": ("quick", {"objective": "blockwise", "block_steps": 8, "cache_windows": 32, "lr_after_fits": 3e-4}),
    "quick-fits16": ("quick", {"objective": "blockwise", "block_steps": 16, "cache_windows": 32,
                               "lr_after_fits": 3e-4}),
    "quick-fits32": ("quick", {"objective": "blockwise", "block_steps": 32, "cache_windows": 64,
                               "lr_after_fits": 3e-4}),
    "full": ("full", {}),
    "full-warm": ("full", {"warmup": 0.25}),
    "full-lr3e-4": ("full", {"lr": 3e-4}),
    "full-blockwise": ("full", {"objective": "blockwise"}),
    # the same tokens per step in longer windows: the evaluation reads windows of 1024
    "full-seq512": ("full", {"seqlen": 512, "batch_size": 2}),
    "full-seq1024": ("full", {"seqlen": 1024, "batch_size": 1}),
    # end-to-end for as long as the block fits and their end-to-end steps take (equal CPU time)
    "full-steps62": ("full", {"steps": 62}),
    "full-blockwise-lr3e-4": ("full", {"objective": "blockwise", "lr": 3e-4}),
    "full-blockwise-lr1e-4": ("full", {"objective": "blockwise", "lr": 1e-4}),
    # the block fits' loss: each token's error relative to its target's norm (what the next RMS norm sees)
    "demo-quick-token": ("demo-quick", {"block_loss": "token"}),
    "demo-full-token": ("demo-full", {"block_steps": 32, "cache_windows": 64, "block_loss": "token"}),
    # distillation alone in the end-to-end steps (no next-token cross-entropy beside the KL)
    "demo-quick-kl": ("demo-quick", {"ce_weight": 0.0}),
    "demo-full-kl": ("demo-full", {"block_steps": 32, "cache_windows": 64, "ce_weight": 0.0}),
    # the next-token cross-entropy alone (no distillation in the end-to-end steps; the fits still use the teacher)
    "demo-quick-ce": ("demo-quick", {"kl_weight": 0.0}),
    "demo-full-ce": ("demo-full", {"kl_weight": 0.0}),
    # 64 block-fit steps on 128 cached windows (measured against the fits32 budget of the time, then made the
    # full budget: demo-full now): with its 40 end-to-end steps, and with 20
    "demo-full-fits64": ("demo-full", {"block_steps": 64, "cache_windows": 128}),
    "demo-full-fits64-steps20": ("demo-full", {"block_steps": 64, "cache_windows": 128, "steps": 20}),
    # every kept block's output held to the dense span's in the end-to-end steps (relative squared error), beside
    # the KL and the cross-entropy, at two weights
    "demo-quick-hidden1": ("demo-quick", {"hidden_weight": 1.0, "hidden_layers": "blocks"}),
    "demo-quick-hidden10": ("demo-quick", {"hidden_weight": 10.0, "hidden_layers": "blocks"}),
    "demo-full-hidden1": ("demo-full", {"hidden_weight": 1.0, "hidden_layers": "blocks"}),
    "demo-full-hidden10": ("demo-full", {"hidden_weight": 10.0, "hidden_layers": "blocks"}),
}


def config(variant: str) -> RecoverConfig:
    budget, changes = VARIANTS[variant]
    return RecoverConfig(**{**BASES[budget], **changes})


def compressed(out: Path, model: str, recipe: str) -> Path:
    folder = out / Path(recipe).stem
    if not (folder / "hf").is_dir():
        started = time.perf_counter()
        compress_model(model, recipe, out=folder / "compressed", dense_out=folder / "hf", overwrite=True,
                       progress=False)
        print(f"compressed {recipe} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def run(folder: Path, model: str, variant: str, limit: int) -> dict:
    print(f"== {variant}", flush=True)
    hf = folder / f"{variant}-hf"
    if not hf.is_dir():
        recover_model(str(folder / "compressed"), teacher=model, out=folder / variant, cfg=config(variant),
                      dense_out=hf, overwrite=True, progress=False)
    report = read_json(folder / variant / "report.json", "report")["recovery"]
    scores = cached(folder / f"{variant}.json", lambda: {t: ppl(hf, t, limit) for t in TASKS})
    fits = report.get("blockwise", {}).get("seconds", 0.0)
    return {"variant": variant, "budget": VARIANTS[variant][0], "changes": VARIANTS[variant][1],
            "objective": report["objective"], "steps": report["steps"], "tokens": report["tokens"],
            "seconds": report["seconds"],
            "blockwise_seconds": fits, **scores}


def markdown(rows: list[dict], before: dict, dense: dict, model: str, recipe: str, limit: int) -> str:
    d = dense["wikitext2"]["perplexity"]
    lines = [f"# Recovery settings for `{recipe}` of {model} at the demo's budgets", "",
             f"WikiText-2 / PTB test perplexity, first {limit} windows of 1024 tokens; (xN) = N times dense "
             f"({d:.2f} / {dense['ptb']['perplexity']:.2f}). Before recovery: "
             f"{before['wikitext2']['perplexity']:.2f} / {before['ptb']['perplexity']:.2f}. Each variant changes "
             "the base (quick / full: the demo's budgets until 2026-12-07, end-to-end at lr 1e-3; demo-quick / "
             "demo-full: the demo's budgets now) as shown and retrains from the compressed model; seconds: "
             "the recovery's own clock (block fits included), each run alone on the machine.", "",
             "| variant | base | changes | objective run | steps | seconds | WikiText-2 | PTB |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        w, p = r["wikitext2"]["perplexity"], r["ptb"]["perplexity"]
        changes = ", ".join(f"{k} {v}" for k, v in r["changes"].items()) or "-"
        lines.append(f"| {r['variant']} | {r['budget']} | {changes} | {r['objective']} | {r['steps']} | "
                     f"{r['seconds']:.0f} | {w:.2f} (x{w / d:.2f}) | {p:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=MODEL, help=f"the dense model (default {MODEL}; a built-in name or folder)")
    p.add_argument("--recipe", default="slim-40", help="a structured recipe (built-in name or file)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--limit", type=int, default=32, help="evaluation windows per task (32)")
    args = p.parse_args()
    folder = compressed(args.out, args.model, args.recipe)
    dense = cached(args.out / "dense.json", lambda: {t: ppl(args.model, t, args.limit) for t in TASKS})
    before = cached(folder / "before.json", lambda: {t: ppl(folder / "hf", t, args.limit) for t in TASKS})
    rows = [run(folder, args.model, v, args.limit) for v in args.variants]
    data = {"model": args.model, "recipe": args.recipe, "limit": args.limit, "dense": dense, "before": before,
            "rows": rows}
    md = markdown(rows, before, dense, args.model, args.recipe, args.limit)
    write_results(args.out, f"recovery-{Path(args.recipe).stem}", data, md)


if __name__ == "__main__":
    main()
