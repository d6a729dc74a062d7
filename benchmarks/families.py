"""Every family of the adapter table (and one without an entry) through compression: the tiny random
model of each (`smartprune.testing`, two blocks of width 32, GPT-2 vocabulary) compressed with the
paper's recipe and with SparseGPT at 50%, on 8 calibration windows of 32 tokens of WikiText-2 train.
Per family and recipe: seconds to compress (`compress()` alone, after one warm-up run of the same
family so that first-use costs are not counted), the compression reached, what structured inference
covers in each block (IRC attention, diagonal V, CSR feed-forward) and what keeps the reference path,
the largest logit difference between the structured model and its `--dense-out` export in vanilla
transformers, and whether greedy generation agrees. Writes JSON and Markdown.

    python benchmarks/families.py --out runs/families
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def calibration(tokenizer, samples: int, seqlen: int):
    from smartprune.data import Calibration, train_text_path

    text = train_text_path("wikitext2").read_text()[:200_000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - seqlen, (samples + 2,), generator=g)
    windows = torch.stack([ids[s:s + seqlen] for s in starts])
    return Calibration(windows[:samples], windows[samples:], "wikitext2 train (first 200,000 characters)")


def measure(name: str, recipe_name: str, calib, tokenizer) -> dict:
    from transformers import AutoModelForCausalLM

    import smartprune
    from smartprune.adapters.install import coverage, use_structure
    from smartprune.compression.engine import compress
    from smartprune.errors import ModelError
    from smartprune.recipes import load_recipe
    from smartprune.testing import family_model

    recipe = load_recipe(recipe_name) if recipe_name == "paper" else _sparsegpt()
    model = family_model(name)
    row = {"family": name, "model_type": model.config.model_type, "recipe": recipe_name,
           "parameters": sum(p.numel() for p in model.parameters())}
    try:
        compress(family_model(name), tokenizer, recipe, calib=calib, progress=False)  # warm-up
    except ModelError as exc:
        return {**row, "refused": str(exc)}
    start = time.perf_counter()
    result = compress(model, tokenizer, recipe, calib=calib, progress=False)
    row["seconds"] = time.perf_counter() - start
    row["compression"] = result.report["overall"]["compression"]
    blocks = [g for k, g in result.report["groups"].items() if k != "fpp_emb"]  # every block linear
    row["block_linears_removed"] = 1 - sum(g["after"] for g in blocks) / sum(g["before"] for g in blocks)
    with tempfile.TemporaryDirectory() as tmp:
        smartprune.write_dense(model, Path(tmp) / "dense")
        vanilla = AutoModelForCausalLM.from_pretrained(Path(tmp) / "dense").eval()
    row["coverage"] = coverage(model)
    row["installed"] = use_structure(model)
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        row["max_logit_difference"] = float((model(ids).logits - vanilla(ids).logits).abs().max())
    greedy = dict(max_new_tokens=16, do_sample=False)
    row["greedy_equal"] = bool(torch.equal(model.generate(ids[:1, :4], **greedy),
                                           vanilla.generate(ids[:1, :4], **greedy)))
    return row


def _sparsegpt():
    from smartprune.recipes.resolve import build_recipe

    return build_recipe({"sparsegpt": {"sparsity": 0.5}}, "sparsegpt-50", "benchmarks/families.py")


def markdown(rows: list[dict]) -> str:
    out = ["| family | model_type | recipe | seconds | compression | block linear parameters removed (biases kept) | "
           "block 0: structured inference | max logit diff vs export | greedy equal |",
           "|---|---|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        if "refused" in r:
            out.append(f"| {r['family']} | {r['model_type']} | {r['recipe']} | refused: {r['refused']} | | | | | |")
            continue
        installed = ", ".join(f"{k} x{v}" for k, v in r["installed"].items())
        cov = "; ".join(r["coverage"]["0"]) if r["recipe"] == "paper" else \
            installed or "none (50% is below the CSR crossover)"
        out.append(f"| {r['family']} | {r['model_type']} | {r['recipe']} | {r['seconds']:.2f} | "
                   f"{100 * r['compression']:.2f}% | {100 * r['block_linears_removed']:.2f}% | {cov} | "
                   f"{r['max_logit_difference']:.1e} | {r['greedy_equal']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    from transformers import AutoTokenizer

    from smartprune.paths import data_dir
    from smartprune.testing import FAMILIES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/families", help="folder for families.json and families.md")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(data_dir() / "gpt2-tokenizer")
    calib = calibration(tokenizer, 8, 32)
    rows = [measure(name, recipe, calib, tokenizer) for name in [*FAMILIES, "bloom"]
            for recipe in ("paper", "sparsegpt")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families.json").write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                                   "rows": rows}, indent=2) + "\n")
    (out / "families.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
