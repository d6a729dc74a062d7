"""Benchmark: WikiText-2 perplexity and accounting of a model dense and after each recipe.

    python benchmarks/recipes.py --model smollm2-135m --recipes paper,paper-30,irc,dwc,fpp-emb,fpp-ff \
        --limit 16 --full dense,paper --out runs/recipes

For each recipe the model is loaded afresh, compressed (seeded), scored on the first ``--limit``
windows of the WikiText-2 test text, and saved under ``OUT/<recipe>/``; the names in ``--full`` are
also scored on the whole test text. Writes ``OUT/results.json`` (updated after every recipe, so an
interrupted run keeps what it finished) and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from smartprune.compression.engine import compress
from smartprune.evaluation import perplexity
from smartprune.files import write_json, write_text
from smartprune.recipes import load_recipe
from smartprune.runs.environment import environment
from smartprune.storage.save import save
from smartprune.storage.sources import load_model


def table(results: dict) -> str:
    rows = ["| model | compression | ppl (first N windows) | ppl (full test) | compress s | IRC after | DWC after "
            "| FPP-emb after | FPP-FF after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["runs"].items():
        g = r.get("groups", {})
        after = [f"{g[k]['after']:,}" if k in g else "-" for k in ("irc", "dwc", "fpp_emb", "fpp_ff")]
        full = f"{r['full']['perplexity']:.2f}" if "full" in r else "-"
        rows.append(f"| {name} | {100 * r.get('compression', 0.0):.2f}% | {r['subset']['perplexity']:.2f} | {full} | "
                    f"{r.get('compress_seconds', 0.0):.0f} | " + " | ".join(after) + " |")
    s = results["settings"]
    return (f"WikiText-2 test perplexity of `{s['model']}`, seqlen {s['seqlen']}, subset = first {s['limit']} "
            f"windows; seed {s['seed']}.\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default="paper,paper-30,irc,dwc,fpp-emb,fpp-ff")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--full", default="dense,paper", help="runs also scored on the whole test text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/recipes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    full = set(filter(None, args.full.split(",")))
    results = {"settings": vars(args), "environment": environment(), "runs": {}}

    def score(model, tok, name, entry):
        entry["subset"] = perplexity(model, tok, "wikitext2", seqlen=args.seqlen, limit=args.limit).to_dict()
        if name in full:
            t = time.perf_counter()
            entry["full"] = perplexity(model, tok, "wikitext2", seqlen=args.seqlen).to_dict()
            entry["full_seconds"] = time.perf_counter() - t
        results["runs"][name] = entry
        write_json(out / "results.json", results)
        write_text(out / "results.md", table(results))

    loaded = load_model(args.model)
    score(loaded.model, loaded.tokenizer, "dense", {"compression": 0.0})
    for name in filter(None, args.recipes.split(",")):
        loaded = load_model(args.model)
        t = time.perf_counter()
        result = compress(loaded.model, loaded.tokenizer, load_recipe(name), seed=args.seed)
        entry = {"compression": result.report["overall"]["compression"], "groups": result.report["groups"],
                 "stages": result.report["stages"], "compress_seconds": time.perf_counter() - t}
        save(loaded.model, out / name, tokenizer=loaded.tokenizer, report=result.report, overwrite=True)
        score(loaded.model, loaded.tokenizer, name, entry)
    sys.stdout.write(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
