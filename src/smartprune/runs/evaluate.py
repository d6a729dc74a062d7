"""`smartprune eval` and `generate`: quality of one or more models on a list of tasks, side by side."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartprune.data import EVAL_TEXTS, eval_text
from smartprune.device import resolve_compute_dtype, resolve_device
from smartprune.errors import DataError
from smartprune.files import write_json
from smartprune.runs.environment import environment
from smartprune.storage.sources import check_model, load_model

log = logging.getLogger(__name__)


def cell(value: float, base: float | None) -> str:
    text = f"{value:,.4f}" if abs(value) < 10 else f"{value:,.2f}"
    if base is None:
        return text
    delta = value - base
    return text + (f" ({delta:+,.4f})" if abs(delta) < 10 else f" ({delta:+,.2f})")


@dataclass
class EvalTable:
    """Results of several models on the same tasks; the first model is the reference column."""

    models: list[str]
    results: dict[str, dict[str, dict]]  # model -> task -> result
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        first = self.models[0]
        return {"results": self.results[first], "models": self.models, "by_model": self.results,
                "settings": self.settings, "environment": environment()}

    def summary(self) -> str:
        from smartprune.evaluation.suite import shown_metrics

        first = self.results[self.models[0]]
        head = "| task | metric | " + " | ".join(self.models) + " |"
        lines = [head, "|---|---|" + "---:|" * len(self.models)]
        for task, res in first.items():
            if res.get("available") is False:
                lines.append(f"| {task} | not available | {res['reason']} |" + " |" * (len(self.models) - 1))
                continue
            for metric in shown_metrics(task, res):
                cells = [cell(self.results[m][task][metric], None if i == 0 else res[metric])
                         for i, m in enumerate(self.models)]
                lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_models(models: list[str], *, tasks: list[str], settings=None, json_path: str | Path | None = None,
                    device: str | torch.device = "auto", compute_dtype: str = "auto", progress: bool = True,
                    resident: str = "dense") -> EvalTable:
    """Every task on every model (loaded one at a time), side by side with the first model, on
    `device` with forward passes in `compute_dtype` (``auto``: bfloat16 on a GPU, float32 on a CPU);
    compressed folders held `resident` "dense" (fastest) or "compact" (smallest, inference only)."""
    from smartprune.device import autocast
    from smartprune.evaluation.suite import EvalSettings, check_tasks, evaluate

    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    settings = settings or EvalSettings()
    tasks = check_tasks(tasks, settings.lm_eval_include, settings.lm_eval_allow_code)
    if resident == "compact" and settings.mode == "finetune":
        raise DataError("--resident compact holds models for inference only; fine-tuned classification needs "
                        "--resident dense")
    for t in tasks:  # missing perplexity texts fail before any model loads
        if t in EVAL_TEXTS:
            eval_text(t)
    for spec in models:  # and so does a bad second model
        check_model(spec)
    results: dict[str, dict[str, dict]] = {}
    for spec in models:
        loaded = load_model(spec, resident=resident)
        if loaded.tokenizer is None:
            raise DataError(f"model {spec} has no tokenizer files; evaluation needs one")
        log.info("evaluating %s on %s (%s, %s)", spec, ", ".join(tasks), dev, str(dtype).removeprefix("torch."))
        loaded.model.to(dev)
        with autocast(dev, dtype):
            results[spec] = evaluate(loaded, tasks, settings, progress=progress)
        del loaded
    table = EvalTable(list(models), results,
                      {**dataclasses.asdict(settings), "device": str(dev), "compute_dtype": str(dtype)[6:]})
    if json_path:
        write_json(Path(json_path), table.to_dict())
    return table


