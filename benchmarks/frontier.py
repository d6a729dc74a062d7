"""The quality-vs-running-cost frontier of SmolLM2-135M: every recipe after the same CPU recovery budget,
each final model held the way a user would deploy it, all timed in one bench run against dense.

Rows made here (compressed, scored on WikiText-2, retrained with the quick demo budget as it was until
2026-11-30: 16 steps of 4 x 128 tokens distilled from the dense model, scored on WikiText-2 and PTB): Wanda
at 50% of the block linears, the ``paper`` and ``paper-structured`` recipes, ``smart-50``, smart's joint
allocation at SparseGPT 50%'s size (``smart-joint-39``, benchmarks/recipes/smart-bl50-joint.yaml) and at 53.5% of all
parameters (``smart-joint-54``: half the dense bytes in float32 with the bitmask); and 8-bit
re-encodings (same masks, one scale per output channel): the dense model (``dense-int8``, the reference
for 8-bit rows) and SparseGPT 50%.
Rows reused from ``benchmarks/structured.py``'s --out folder (made with the same budget and windows):
SparseGPT 50%, and the structured exports (depth / width / mix; ``slim-40`` is the built-in recipe of
mix-40). Compressed folders are held compact (the packed form, with the compiled kernel), exported
folders as plain transformers models; fp32 compute everywhere.

    python benchmarks/frontier.py --structured runs/structured --out runs/frontier

Every step writes into --out and is skipped when its output exists (re-running resumes). Results:
``frontier.json``, ``frontier.md`` and ``frontier.png`` in --out.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import yaml
from common import QUICK_END_TO_END, cached, ppl  # beside this file: the benchmarks' shared helpers
from structured import RECOVER_STEPS  # the structured benchmark's budget (its rows are reused here)

from smartprune.files import read_json, write_results
from smartprune.recipes.schema import RecoverConfig
from smartprune.runs.bench import BenchSettings, bench
from smartprune.runs.compress import compress_model
from smartprune.runs.recover import recover_model
from smartprune.storage.sources import converted_builtin, load_model

MODEL = "smollm2-135m"
# made here: name -> built-in recipe name or recipe fields
RECIPES = Path(__file__).parent / "recipes"
MADE = {"wanda-50": {"wanda": {"sparsity": 0.5}}, "paper": "paper", "paper-structured": "paper-structured",
        "smart-50": "smart-50",
        # smart's joint allocation at SparseGPT 50%'s size (39.46% of all parameters; docs/smart-results.md 9)
        "smart-joint-39": str(RECIPES / "smart-bl50-joint.yaml"),
        # the same at 53.5% of all parameters: where a float32 bitmask model holds half the dense bytes
        "smart-joint-54": {"overall": {"target": 0.535, "max_rate": 0.9, "points": 2, "spread": 0.2,
                                       "sensitivity": "joint", "emb_criterion": "frequency"},
                           "fpp_emb": {"p_pos": 0.05, "p_neg": 0.05, "criterion": "frequency", "steps": 0},
                           "sparsegpt": {}}}
# reused from the structured benchmark: name -> final folder inside it
REUSED = {"sparsegpt-50": "sparsegpt-50/recovered", "depth-40": "depth-40/recovered-hf",
          "width-40": "width-40/recovered-hf", "mix-25": "mix-25/recovered-hf", "mix-40": "mix-40/recovered-hf",
          "depth-50": "depth-50/recovered-hf", "width-50": "width-50/recovered-hf", "mix-50": "mix-50/recovered-hf"}
INT8 = {"dense-int8": None, "sparsegpt-50-int8": "sparsegpt-50/recovered"}  # None: the dense model
TASKS = ("wikitext2", "ptb")


def made_row(name: str, recipe: str | dict, out: Path, limit: int, steps: int) -> dict:
    """Compress (compact folder), score, retrain with the quick demo budget, score again."""
    print(f"== {name}", flush=True)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(recipe, dict):
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        recipe = folder / "recipe.yaml"
    if not (folder / "compressed").is_dir():
        compress_model(MODEL, recipe, out=folder / "compressed", overwrite=True, progress=False)
    report = read_json(folder / "compressed" / "report.json", "report")
    before = cached(folder / "before.json", lambda: {"wikitext2": ppl(folder / "compressed", "wikitext2", limit)})
    if not (folder / "recovered").is_dir():
        cfg = RecoverConfig(**{**QUICK_END_TO_END, "steps": steps})
        recover_model(str(folder / "compressed"), teacher=MODEL, out=folder / "recovered", cfg=cfg, overwrite=True,
                      progress=False)
    recovery = read_json(folder / "recovered" / "report.json", "report").get("recovery", {})
    after = cached(folder / "after.json", lambda: {t: ppl(folder / "recovered", t, limit) for t in TASKS})
    return {"name": name, "kind": "made", "compression": report["overall"]["compression"], "before": before,
            "after": after, "recover_seconds": recovery.get("seconds"), "folder": str(folder / "recovered"),
            "held": "compact"}


def reused_row(name: str, structured: Path) -> dict:
    folder = structured / REUSED[name]
    base = structured / name
    report = read_json(base / "compressed" / "report.json", "report")
    return {"name": name, "kind": "structured benchmark", "compression": report["overall"]["compression"],
            "before": read_json(base / "before.json", "result"), "after": read_json(base / "after.json", "result"),
            "folder": str(folder), "held": "compact" if (folder / "smartprune.json").is_file() else "exported folder"}


def int8_row(name: str, source: str | None, structured: Path, out: Path, limit: int) -> dict:
    """An 8-bit re-encoding of the dense model (source None) or of a compressed folder; scored as stored."""
    from transformers import AutoTokenizer

    from smartprune.storage.load import load
    from smartprune.storage.save import save

    print(f"== {name}", flush=True)
    target = out / name
    if not target.is_dir():
        model = load_model(MODEL).model if source is None else load(structured / source, structured=False)
        tokenizer = AutoTokenizer.from_pretrained(converted_builtin(MODEL) if source is None else structured / source)
        save(model, target, tokenizer=tokenizer, dtype="int8")
    after = cached(out / f"{name}.json", lambda: {t: ppl(target, t, limit) for t in TASKS})
    origin = read_json(structured / source.split("/")[0] / "compressed" / "report.json", "report") if source else None
    compression = origin["overall"]["compression"] if origin else 0.0
    return {"name": name, "kind": "8-bit re-encoding", "compression": compression, "before": None, "after": after,
            "folder": str(target), "held": "compact, int8 values"}


def markdown(data: dict) -> str:
    speed = {m["name"]: m for m in data["bench"]["models"]}
    dense_int8 = next((r for r in data["rows"] if r["name"] == "dense-int8"), None)
    ref8 = speed.get(dense_int8["folder"]) if dense_int8 else None
    d = data["dense"]["after"]["wikitext2"]["perplexity"]
    lines = ["# The frontier: quality against running cost, SmolLM2-135M", "",
             f"WikiText-2 / PTB test perplexity on the first {data['limit']} windows of 1024 tokens, after the quick "
             f"demo recovery budget ({data['steps']} steps of 4 x 128 tokens, distillation from the dense model). "
             "Running cost from one bench run (fp32 compute, 2 threads, median of the rounds): greedy decoding "
             "tokens/s (batch 1, 128 new tokens), 512-token prefill, bytes of weights held in memory, peak RSS of "
             "a fresh process that loads the model and runs one 512-token forward. (xN) = N times dense fp32 "
             "(prefill: N times faster); [xN] for 8-bit rows = against dense-int8 (the same precision).", "",
             "| model | held as | removed | WT2 before | WT2 after (x dense) | PTB after | decode tok/s | "
             "512 prefill s | weights held MB | peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in [data["dense"], *data["rows"]]:
        m = speed.get(row["folder"], {"metrics": {}, "ratios": {}})
        int8 = row["held"].endswith("int8 values") and row["name"] != "dense-int8" and ref8 is not None

        def cell(key: str, scale: float = 1, digits: int = 2, m=m, row=row, int8=int8) -> str:
            if key not in m["metrics"]:
                return "-"
            v = m["metrics"][key]
            inv = key.startswith("latency")
            text = f"{v * scale:,.{digits}f}"
            if row is not data["dense"]:
                text += f" (x{1 / m['ratios'][key] if inv else m['ratios'][key]:.2f})"
            if int8:
                r8 = v / ref8["metrics"][key]
                text += f" [x{1 / r8 if inv else r8:.2f}]"
            return text

        before = row["before"]["wikitext2"]["perplexity"] if row.get("before") else None
        after = row["after"]["wikitext2"]["perplexity"]
        lines.append(f"| {row['name']} | {row['held']} | {100 * row['compression']:.1f}% | "
                     f"{'-' if before is None else f'{before:,.2f}'} | {after:,.2f} ({after / d:.2f}x) | "
                     f"{row['after']['ptb']['perplexity']:,.2f} | {cell('generate_tokens_per_s')} | "
                     f"{cell('latency_b1_512', 1, 3)} | {cell('resident_bytes', 1e-6, 0)} | "
                     f"{cell('peak_rss_bytes', 1e-6, 0)} |")
    lines += ["", "Goal: WikiText-2 after recovery at most 1.5x dense, decoding at least 1.5x dense, at most 0.5x "
              "the dense weight bytes, speed and bytes against dense in the same precision.", ""]
    for row in data["rows"]:
        m = speed.get(row["folder"])
        if m is None:
            continue
        if row["name"] == "dense-int8":  # against the dense model in its own precision it is 1.00x everywhere
            lines.append("- dense-int8: the dense model in 8 bits, the same-precision reference of the 8-bit rows "
                         "(not a compression)")
            continue
        ref = ref8 if row["held"].endswith("int8 values") and ref8 else None
        q = row["after"]["wikitext2"]["perplexity"] / d
        s = m["metrics"]["generate_tokens_per_s"] / (ref or speed[data["dense"]["folder"]])["metrics"][
            "generate_tokens_per_s"]
        b = m["metrics"]["resident_bytes"] / (ref or speed[data["dense"]["folder"]])["metrics"]["resident_bytes"]
        met = q <= 1.5 and s >= 1.5 and b <= 0.5
        lines.append(f"- {row['name']}: quality {q:.2f}x dense ({'ok' if q <= 1.5 else 'over'}), decode "
                     f"{s:.2f}x ({'ok' if s >= 1.5 else 'under'}), weights {b:.2f}x ({'ok' if b <= 0.5 else 'over'})"
                     f"{' against dense-int8' if ref else ''}: {'MEETS the goal' if met else 'misses'}")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {m["name"]: m for m in data["bench"]["models"]}
    dense = speed[data["dense"]["folder"]]["metrics"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, label in ((axes[0], "generate_tokens_per_s", "greedy decoding, x dense tokens/s"),
                           (axes[1], "resident_bytes", "weights held in memory, x dense")):
        for row in [data["dense"], *data["rows"]]:
            m = speed.get(row["folder"])
            if m is None:
                continue
            x, y = m["metrics"][key] / dense[key], row["after"]["wikitext2"]["perplexity"]
            is_dense = row is data["dense"]
            ax.scatter(x, y, marker="*" if is_dense else ("s" if row["held"].startswith("compact") else "o"),
                       s=140 if is_dense else 40)
            ax.annotate(row["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        d = data["dense"]["after"]["wikitext2"]["perplexity"]
        ax.axhline(1.5 * d, ls="--", lw=0.8, color="grey")
        ax.axvline(1.5 if key.startswith("generate") else 0.5, ls="--", lw=0.8, color="grey")
        ax.set_xlabel(label + " (fp32 dense = 1; dashed: the goal)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"WikiText-2 perplexity after recovery ({data['limit']} windows)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--structured", type=Path, required=True, help="benchmarks/structured.py's --out folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=32, help="evaluation windows per task (32)")
    p.add_argument("--recover-steps", type=int, default=RECOVER_STEPS)  # the structured rows' budget
    p.add_argument("--repeats", type=int, default=2, help="bench rounds (2)")
    p.add_argument("--only", nargs="+", default=None, help="rows to include (default: all)")
    p.add_argument("--no-bench", action="store_true", help="make and score the rows only")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def keep(name: str) -> bool:
        return args.only is None or name in args.only

    dense_folder = str(converted_builtin(MODEL))
    dense_scores = read_json(args.structured / "dense.json", "dense scores")
    dense = {"name": "dense", "kind": "dense", "compression": 0.0, "before": None, "after": dense_scores["after"],
             "folder": dense_folder, "held": "plain"}
    rows = [reused_row(n, args.structured) for n in REUSED if keep(n)]
    rows += [int8_row(n, s, args.structured, args.out, args.limit) for n, s in INT8.items() if keep(n)]
    for name, recipe in MADE.items():
        if keep(name):
            rows.append(made_row(name, recipe, args.out, args.limit, args.recover_steps))
    if args.no_bench:
        return
    print("== bench", flush=True)
    specs = [dense_folder, *[r["folder"] for r in rows]]
    key = hashlib.sha256("\n".join(specs).encode()).hexdigest()[:8]
    timed = cached(args.out / f"bench-{key}.json", lambda: bench(specs, BenchSettings(
        repeats=args.repeats, lengths=(512,), batches=(8,), residencies=("compact",), device="cpu",
        compute_dtypes=("float32",), train=False), progress=False).to_dict())
    data = {"model": MODEL, "limit": args.limit, "steps": args.recover_steps, "dense": dense, "rows": rows,
            "bench": timed}
    write_results(args.out, "frontier", data, markdown(data))
    plot(data, args.out / "frontier.png")
    print(markdown(data))


if __name__ == "__main__":
    main()
