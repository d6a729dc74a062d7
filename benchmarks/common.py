"""What the benchmark scripts share: a step's result cached as JSON in the run's folder (so a re-run
resumes), and one model folder's perplexity on a test set. Imported by the scripts beside this file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smartprune.evaluation import perplexity
from smartprune.files import read_json, write_json
from smartprune.recipes.schema import RECOVERY_BUDGETS
from smartprune.storage.sources import load_model

MODEL = "smollm2-135m"
# The quick budget as the committed rows of the older benchmarks measured it: end-to-end, without the block
# fits it takes since 2026-12-07 (their settings left at the defaults those runs had)
QUICK_END_TO_END = {**{k: v for k, v in RECOVERY_BUDGETS["quick"].items()
                       if k not in ("block_steps", "cache_windows", "lr_after_fits")}, "objective": "end_to_end"}


def cached(path: Path, make: Callable[[], dict]) -> dict:
    """The result stored at `path`, or `make()`'s, stored there first (a finished step is never redone)."""
    if path.is_file():
        return read_json(path, "cached result")
    data = make()
    write_json(path, data)
    return data


def ppl(folder: Path | str, task: str, limit: int) -> dict:
    """Perplexity of the model in `folder` on the first `limit` windows of `task`, with the window count."""
    loaded = load_model(str(folder))
    r = perplexity(loaded.model, loaded.tokenizer, task, limit=limit, progress=False)
    return {"perplexity": r.perplexity, "windows": r.windows}
