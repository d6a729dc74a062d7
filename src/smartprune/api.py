"""High-level library calls behind the CLI: each takes plain values and returns a result with
``to_dict()`` (what goes to JSON) and ``summary()`` (what a person reads)."""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartprune.accounting import format_table
from smartprune.artifact import check_output, save, write_dense, write_json
from smartprune.data import eval_text, train_text_path
from smartprune.engine import compress
from smartprune.errors import DataError
from smartprune.evaluation.perplexity import check_limit, perplexity
from smartprune.loading import load_model
from smartprune.recipes import Recipe, load_recipe

log = logging.getLogger(__name__)


def environment() -> dict:
    """What the numbers were measured on."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor()}


def with_calibration(recipe: Recipe, samples: int | None = None, seqlen: int | None = None) -> Recipe:
    """`recipe` with its calibration window count / length overridden where given."""
    changes = {k: v for k, v in (("samples", samples), ("seqlen", seqlen)) if v is not None}
    if not changes:
        return recipe
    return recipe.replace(calibration=dataclasses.replace(recipe.calibration, **changes))


def _stage_seconds(report: dict) -> dict[str, float]:
    return {k: v["seconds"] for k, v in report["stages"].items()}


@dataclass
class CompressRun:
    report: dict
    out: Path
    dense_out: Path | None

    def summary(self) -> str:
        r = self.report
        lines = [f"compressed {r['model']} with recipe '{r['recipe']}' in {r['seconds']:.0f} s "
                 f"(overall compression {100 * r['overall']['compression']:.2f}%)", "",
                 format_table(r, _stage_seconds(r)), "", f"compressed model: {self.out}"]
        if self.dense_out:
            lines.append(f"dense Hugging Face folder: {self.dense_out}")
        return "\n".join(lines)


def compress_model(model: str, recipe: str | Path | Recipe, *, out: str | Path, dense_out: str | Path | None = None,
                   seed: int = 0, overwrite: bool = False, calib_samples: int | None = None,
                   calib_seqlen: int | None = None, progress: bool = True) -> CompressRun:
    """Load MODEL, compress it with `recipe`, write it to `out` (and a dense HF folder to `dense_out`)."""
    out = Path(out)
    check_output(out, overwrite)
    if dense_out is not None:
        check_output(Path(dense_out), overwrite)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    recipe = with_calibration(recipe, calib_samples, calib_seqlen)
    train_text_path(recipe.calibration.text)  # missing data fails before the model loads
    loaded = load_model(model)
    result = compress(loaded.model, loaded.tokenizer, recipe, seed=seed, progress=progress)
    report = {"model": model, "source": loaded.source, **result.report, "environment": environment()}
    save(loaded.model, out, tokenizer=loaded.tokenizer, report=report, overwrite=overwrite)
    if dense_out is not None:
        write_dense(loaded.model, dense_out, tokenizer=loaded.tokenizer, overwrite=overwrite)
    return CompressRun(report, out, Path(dense_out) if dense_out else None)


@dataclass
class DemoRun:
    model: str
    recipe: str
    dense: dict
    compressed: dict
    report: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        d, c = self.dense, self.compressed
        ratio = c["perplexity"] / d["perplexity"]
        s = self.seconds
        return "\n".join([
            f"{self.model}, recipe '{self.recipe}'",
            "",
            f"WikiText-2 test perplexity, first {d['windows']} windows of {d['seqlen']} tokens "
            f"({d['tokens']:,} scored tokens):",
            "",
            "| model | perplexity |",
            "|---|---:|",
            f"| dense | {d['perplexity']:.2f} |",
            f"| compressed | {c['perplexity']:.2f} ({ratio:.2f}x dense) |",
            "",
            format_table(self.report, _stage_seconds(self.report)),
            "",
            f"time: load {s['load']:.0f} s, dense eval {s['dense_eval']:.0f} s, compress {s['compress']:.0f} s, "
            f"compressed eval {s['compressed_eval']:.0f} s, total {s['total']:.0f} s",
        ])


def run_demo(model: str = "smollm2-135m", recipe: str | Path = "paper", *, quick: bool = False,
             limit: int | None = None, seed: int = 0, seqlen: int = 1024, json_path: str | Path | None = None,
             progress: bool = True) -> DemoRun:
    """The main job: perplexity of MODEL before and after compressing it with `recipe`.

    Default subset: the first 16 windows of 1024 tokens of the WikiText-2 test text. ``quick``
    uses 4 evaluation windows and 8 calibration windows of 64 tokens (a few minutes on two cores).
    """
    check_limit(limit)
    t0 = time.perf_counter()
    rec = load_recipe(recipe)
    if quick:
        rec = with_calibration(rec, samples=8, seqlen=64)
    limit = limit or (4 if quick else 16)
    train_text_path(rec.calibration.text)
    eval_text("wikitext2")  # both data files are checked before the model loads
    loaded = load_model(model)
    seconds = {"load": time.perf_counter() - t0}
    t = time.perf_counter()
    dense = perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=seqlen, limit=limit, progress=progress)
    seconds["dense_eval"] = time.perf_counter() - t
    t = time.perf_counter()
    result = compress(loaded.model, loaded.tokenizer, rec, seed=seed, progress=progress)
    seconds["compress"] = time.perf_counter() - t
    t = time.perf_counter()
    after = perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=seqlen, limit=limit, progress=progress)
    seconds["compressed_eval"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    run = DemoRun(model, rec.name, dense.to_dict(), after.to_dict(),
                  {**result.report, "environment": environment()}, seconds)
    if json_path:
        write_json(Path(json_path), run.to_dict())
    return run


@dataclass
class PerplexityTable:
    models: list[str]
    results: dict[str, dict[str, dict]]  # model -> task -> PerplexityResult dict

    def to_dict(self) -> dict:
        # `results` keyed by task for the first model; every model under `models_results`.
        first = self.models[0]
        return {"results": self.results[first], "models": self.models, "by_model": self.results}

    def summary(self) -> str:
        tasks = list(self.results[self.models[0]])
        head = "| task | " + " | ".join(self.models) + " |"
        lines = [head, "|---|" + "---:|" * len(self.models)]
        for task in tasks:
            base = self.results[self.models[0]][task]["perplexity"]
            cells = []
            for i, m in enumerate(self.models):
                p = self.results[m][task]["perplexity"]
                cells.append(f"{p:.2f}" if i == 0 else f"{p:.2f} ({p - base:+.2f})")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_perplexity(models: list[str], *, tasks: list[str], seqlen: int = 1024, stride: int | None = None,
                        limit: int | None = None, json_path: str | Path | None = None,
                        progress: bool = True) -> PerplexityTable:
    """Perplexity of each model on each task, with the first model as the reference column."""
    check_limit(limit)
    results: dict[str, dict[str, dict]] = {}
    for spec in models:
        loaded = load_model(spec)
        if loaded.tokenizer is None:
            raise DataError(f"model {spec} has no tokenizer files; perplexity needs one")
        results[spec] = {t: perplexity(loaded.model, loaded.tokenizer, t, seqlen=seqlen, stride=stride, limit=limit,
                                       progress=progress).to_dict() for t in tasks}
    table = PerplexityTable(list(models), results)
    if json_path:
        write_json(Path(json_path), table.to_dict())
    return table
