"""How long a recipe's allocation takes (`allocation.plan`: the joint measurement of `smart-40` by
default) on SmolLM2-135M, and the per-matrix rates it chose, so two versions of the code can be compared
rate for rate (``--against`` an earlier run's JSON).

    python benchmarks/joint_time.py --out runs/joint-time [--recipe smart-40] [--against OLD.json]

Results: ``joint-time.json`` (seconds, rates, allocation report) and ``joint-time.md`` in --out. Time it
alone on the machine: two cores shared with anything else can run several times slower.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from smartprune.adapters import get_adapter
from smartprune.compression.allocation import plan
from smartprune.data import calibration
from smartprune.files import read_json, write_results
from smartprune.recipes import load_recipe
from smartprune.storage.sources import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", default="smart-40")
    ap.add_argument("--against", type=Path, help="an earlier joint-time.json: compare the rates")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    recipe = load_recipe(args.recipe)
    c = recipe.calibration
    calib = calibration(loaded.tokenizer, c.text, c.samples, c.seqlen, c.eval_samples, 0)
    stage = next(k for k in ("sparsegpt", "wanda", "magnitude") if k in recipe.stages)
    t = time.perf_counter()
    rates, report = plan(get_adapter(loaded.model), recipe.overall, calib.ids, calib.eval_ids,
                         embedding="fpp_emb" in recipe.stages, blocks=True, stage=stage,
                         stage_cfg=recipe.stages[stage], progress=True)
    seconds = time.perf_counter() - t
    data = {"recipe": args.recipe, "seconds": seconds, "threads": torch.get_num_threads(), "rates": rates,
            "allocation": report}
    lines = [f"`{args.recipe}`'s allocation on SmolLM2-135M: {seconds:.0f} s ({torch.get_num_threads()} threads), "
             f"{len(rates)} matrices, sensitivity {report['sensitivity']}"]
    if args.against:
        old = read_json(args.against, "earlier run")
        diff = {k: rates[k] - old["rates"][k] for k in rates}
        changed = {k: round(v, 6) for k, v in diff.items() if abs(v) > 1e-9}
        data["against"] = {"file": str(args.against), "seconds": old["seconds"], "changed": changed}
        lines.append(f"against {args.against} ({old['seconds']:.0f} s): {len(changed)} of {len(rates)} rates differ"
                     + (f", at most by {max(abs(v) for v in changed.values()):.4f}" if changed else ""))
    write_results(args.out, "joint-time", data, "\n\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
