"""Quality per CPU-minute: recovery objectives compared on the same compressed SmolLM2-135M models.

Each variant retrains the same compressed folder (a `compress --out` folder; by default the models
`benchmarks/structured.py` made) distilling from the dense model, and records the held-out curve
(perplexity on the WikiText-2 validation windows the recovery watches, against the seconds spent:
model loading excluded, held-out checks included) and the final WikiText-2 test perplexity on --limit
windows. Variants: end-to-end distillation at the demo's budgets, block-wise reconstruction at a few
steps per block, and block-wise followed by end-to-end steps (`smartprune.training.blockwise`).

    python benchmarks/recovery_budget.py --models runs/structured/sparsegpt-50 runs/structured/width-40 \\
        --out runs/recovery-budget

Every run is cached in --out (re-running resumes; the tables cover every run in --out, so models can
be given different --variants in separate invocations). Results: ``recovery-budget.json``, ``.md``,
``.png``.
Time it alone: the seconds are the point.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import QUICK_END_TO_END  # beside this file: the benchmarks' shared helpers

from smartprune.evaluation import perplexity
from smartprune.files import read_json, write_json, write_results
from smartprune.recipes.schema import RecoverConfig
from smartprune.runs.recover import recover_model
from smartprune.storage.sources import load_model

MODEL = "smollm2-135m"
QUICK = QUICK_END_TO_END  # 8 steps of 4 x 128 tokens, lr 1e-3 (16 in docs/frontier.md's run), as measured
VARIANTS: dict[str, dict] = {
    "end-to-end 16 (quick demo)": {**QUICK, "steps": 16},  # the quick demo's budget when this was measured
    "end-to-end 48": {**QUICK, "steps": 48},
    "blockwise 32/block": {**QUICK, "objective": "blockwise", "block_steps": 32, "steps": 0},
    "blockwise 32/block + end-to-end 16": {**QUICK, "objective": "blockwise", "block_steps": 32, "steps": 16},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run_variant(model_folder: Path, name: str, fields: dict, out: Path, limit: int) -> dict:
    folder = out / model_folder.name / slug(name)
    done = folder / "result.json"
    if done.is_file():
        return read_json(done, "cached result")
    print(f"== {model_folder.name}: {name}", flush=True)
    cfg = RecoverConfig(**fields)
    run = recover_model(str(model_folder / "compressed"), teacher=MODEL, out=folder / "recovered", cfg=cfg,
                        overwrite=True, progress=False)
    loaded = load_model(str(folder / "recovered"))
    final = perplexity(loaded.model, loaded.tokenizer, "wikitext2", limit=limit, progress=False)
    rec = run.recovery
    result = {"model": model_folder.name, "variant": name, "config": fields, "seconds": rec["seconds"],
              "held_out": rec["held_out"], "held_out_text": rec["held_out_text"],
              "blockwise": rec.get("blockwise"), "wikitext2": {"perplexity": final.perplexity,
                                                               "windows": final.windows}}
    write_json(done, result)
    return result


def markdown(rows: list[dict], limit: int) -> str:
    lines = ["# Recovery per CPU-minute (SmolLM2-135M)", "",
             f"Final WikiText-2 test perplexity on the first {limit} windows; held-out = the recovery's own "
             "validation windows; seconds = recovery wall time on this CPU (loading excluded).", "",
             "| model | variant | seconds | held-out before | held-out after | WikiText-2 after |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        h = r["held_out"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['seconds']:.0f} | {h[0]['perplexity']:,.2f} | "
                     f"{h[-1]['perplexity']:,.2f} | {r['wikitext2']['perplexity']:,.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in (r for r in rows if r["model"] == model):
            xs = [h["seconds"] / 60 for h in r["held_out"]]
            ax.plot(xs, [h["perplexity"] for h in r["held_out"]], marker="o", label=r["variant"])
        ax.set(title=model, xlabel="CPU minutes (2 cores)", ylabel="held-out perplexity", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, nargs="+", default=[Path("runs/structured/sparsegpt-50"),
                                                             Path("runs/structured/width-40")],
                   help="folders holding a `compressed` model (benchmarks/structured.py's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--limit", type=int, default=32, help="WikiText-2 test windows for the final score (32)")
    args = p.parse_args()
    for m in args.models:
        for v in args.variants:
            run_variant(m, v, VARIANTS[v], args.out, args.limit)
    # every run in --out, this invocation's and earlier ones' (a variant subset per model is fine)
    order = list(VARIANTS)
    rows = sorted((read_json(f, "cached result") for f in args.out.glob("*/*/result.json")),
                  key=lambda r: (r["model"], order.index(r["variant"]) if r["variant"] in order else len(order)))
    data = {"model": MODEL, "limit": args.limit, "rows": rows}
    write_results(args.out, "recovery-budget", data, markdown(rows, args.limit))
    plot(rows, args.out / "recovery-budget.png")
    print(markdown(rows, args.limit))


if __name__ == "__main__":
    main()
