"""The structured rungs of SmolLM2-135M (25%, 40%, 50% of all parameters removed by the allocated mix of
blocks, heads and feed-forward neurons), each with compensation at removal on and off, scored before
retraining, after the demo's quick budget and after its full budget (both from the compressed model).

    python benchmarks/structured_rungs.py --out runs/rungs

Every step is cached in --out (re-running resumes). Results: ``rungs.json``, ``rungs.md``, ``rungs.png``.
WikiText-2 and PTB on the first --limit windows of 1024 tokens; the dense model beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from common import MODEL, cached, ppl  # beside this file: the benchmarks' shared helpers

from smartprune.files import read_json, write_results
from smartprune.recipes.schema import RECOVERY_BUDGETS, RecoverConfig
from smartprune.runs.compress import compress_model
from smartprune.runs.recover import recover_model
from smartprune.storage.sources import converted_builtin

TASKS = ("wikitext2", "ptb")
BUDGETS = ("quick", "full")


def recipe(rate: float, compensate: bool, plan: str = "zeroed") -> dict:
    """`slim-40`'s recipe at `rate` (the built-in rungs are these with compensation on); `plan`: how the
    structure plan scores its candidates (overall.structure)."""
    overall = {"target": rate, "max_rate": 0.9, **({"structure": plan} if plan != "zeroed" else {})}
    return {"export": "standard", "overall": overall, "depth": {"iterative": False},
            "attn_heads": {"unit": "query", "criterion": "activation", "compensate": compensate},
            "ff_neurons": {"criterion": "activation", "compensate": compensate}}


def run(rate: float, compensate: bool, out: Path, limit: int, plan: str = "zeroed") -> dict:
    name = f"slim-{round(100 * rate)}-{'comp' if compensate else 'plain'}" + ("-cplan" if plan == "compensated" else "")
    print(f"== {name}", flush=True)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe(rate, compensate, plan)))
    if not (folder / "hf").is_dir():
        compress_model(MODEL, folder / "recipe.yaml", out=folder / "compressed", dense_out=folder / "hf",
                       overwrite=True, progress=False)
    report = read_json(folder / "compressed" / "report.json", "report")
    row = {"name": name, "rate": rate, "compensate": compensate, "plan": plan,
           "compression": report["overall"]["compression"],
           "structure": report.get("structure", {}).get("plan", {}).get("chosen"),
           "before": cached(folder / "before.json", lambda: {t: ppl(folder / "hf", t, limit) for t in TASKS})}
    for budget in BUDGETS:
        hf = folder / f"{budget}-hf"
        if not hf.is_dir():
            recover_model(str(folder / "compressed"), teacher=MODEL, out=folder / budget,
                          cfg=RecoverConfig(**RECOVERY_BUDGETS[budget]), dense_out=hf, overwrite=True, progress=False)
        row[budget] = cached(folder / f"{budget}.json", lambda hf=hf: {t: ppl(hf, t, limit) for t in TASKS})
    return row


def markdown(data: dict) -> str:
    d = data["dense"]
    q, f = RECOVERY_BUDGETS["quick"], RECOVERY_BUDGETS["full"]
    lines = ["# Structured rungs of SmolLM2-135M: compensation at removal, before and after retraining", "",
             f"WikiText-2 / PTB test perplexity, first {data['limit']} windows of 1024 tokens; (xN) = N times dense "
             f"({d['wikitext2']['perplexity']:.2f} / {d['ptb']['perplexity']:.2f}). Quick budget: {q['steps']} steps "
             f"of {q['batch_size']} x {q['seqlen']} tokens; full: {f['steps']} steps of {f['batch_size']} x "
             f"{f['seqlen']} (distillation from the dense model, lr {q['lr']:g}, both from the compressed model).", "",
             "| recipe | compensation | plan scored | removed | blocks / heads per group / neurons per block "
             "| WT2 before | PTB before | WT2 quick | PTB quick | WT2 full | PTB full |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        s = r["structure"] or {}
        shape = f"{s.get('blocks_removed')} / {s.get('heads_removed_per_group')} / {s.get('neurons_removed_per_block')}"
        cells = []
        for phase in ("before", *BUDGETS):
            for t in TASKS:
                p = r[phase][t]["perplexity"]
                cells.append(f"{p:,.2f} (x{p / d[t]['perplexity']:.2f})")
        lines.append(f"| slim-{round(100 * r['rate'])} | {'on' if r['compensate'] else 'off'} | "
                     f"{r.get('plan', 'zeroed')} | "
                     f"{100 * r['compression']:.1f}% | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = data["dense"]["wikitext2"]["perplexity"]
    for compensate, plan, style in ((True, "zeroed", "-o"), (True, "compensated", "-^"), (False, "zeroed", "--s")):
        rows = sorted((r for r in data["rows"] if r["compensate"] is compensate and r.get("plan", "zeroed") == plan),
                      key=lambda r: r["rate"])
        for phase in ("before", *BUDGETS):
            ax.plot([100 * r["compression"] for r in rows], [r[phase]["wikitext2"]["perplexity"] / dense for r in rows],
                    style, label=f"{phase}, compensation {'on' if compensate else 'off'}, plan {plan}")
    ax.axhline(1.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("% of all parameters removed")
    ax.set_ylabel(f"WikiText-2 perplexity / dense ({data['limit']} windows)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.4, 0.5])
    p.add_argument("--limit", type=int, default=32, help="evaluation windows per task (32)")
    p.add_argument("--no-plain", action="store_true", help="compensation on only (no ablation rows)")
    p.add_argument("--plans", nargs="+", default=["zeroed", "compensated"], choices=("zeroed", "compensated"),
                   help="how the structure plan scores candidates (overall.structure); compensated: only with "
                   "compensation on (both)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dense_folder = Path(converted_builtin(MODEL))
    dense = cached(args.out / "dense.json", lambda: {t: ppl(dense_folder, t, args.limit) for t in TASKS})
    rows = []
    variants = [(True, plan) for plan in args.plans] + ([] if args.no_plain else [(False, "zeroed")])
    for compensate, plan in variants:  # compensation on first: the recipes' default
        for rate in args.rates:
            rows.append(run(rate, compensate, args.out, args.limit, plan))
            data = {"model": MODEL, "limit": args.limit, "dense": dense, "rows": rows}
            write_results(args.out, "rungs", data, markdown(data))
    plot(data, args.out / "rungs.png")


if __name__ == "__main__":
    main()
