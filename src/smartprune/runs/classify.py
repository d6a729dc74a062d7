"""`smartprune classify`: fine-tune a classifier, compress it, and score it before and after (Table 6)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from smartprune.compression.engine import compress
from smartprune.device import resolve_compute_dtype, resolve_device
from smartprune.errors import DataError
from smartprune.files import write_json
from smartprune.recipes import Recipe, load_recipe
from smartprune.runs.environment import environment
from smartprune.runs.evaluate import cell
from smartprune.runs.spec import RunSpec
from smartprune.storage.sources import load_model


@dataclass
class ClassifierRun:
    """A fine-tuned classifier before and after compression (the paper's Table 6 setting)."""

    model: str
    task: str
    recipe: str
    dense: dict
    compressed: dict
    training: dict
    report: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "results": {self.task: self.compressed}, "environment": environment()}

    def summary(self) -> str:
        lines = [f"{self.model} fine-tuned on {self.task} ({self.training['examples']} examples, "
                 f"{self.training['steps']} steps), compressed with '{self.recipe}' "
                 f"({100 * self.report['overall']['compression']:.2f}%)", "",
                 "| metric | fine-tuned | compressed |", "|---|---:|---:|"]
        for m in ("accuracy", "precision", "recall", "f1_weighted", "loss", "mcc", "f1"):
            if m in self.dense:
                lines.append(f"| {m} | {cell(self.dense[m], None)} | {cell(self.compressed[m], self.dense[m])} |")
        s = self.seconds
        lines += ["", f"time: fine-tune {s['finetune']:.0f} s, compress {s['compress']:.0f} s, "
                  f"evaluation {s['evaluate']:.0f} s"]
        return "\n".join(lines)


CALIB_EXAMPLES = 64  # calibration examples of the task's train split (calib_samples)


def compress_classifier(model: str, task: str, recipe: str | Path | Recipe, *, finetune=None,
                        examples: int | None = None, **options) -> ClassifierRun:
    """Fine-tune MODEL on `task`, score its dev split (`examples` of it), compress it with `recipe`
    (stages with ``objective: task`` fit the classification loss), and score it again. Fine-tuning and
    scoring run on ``device`` in ``compute_dtype``; the compression itself runs on the CPU. Other
    `options`: ``calib_samples`` (calibration examples, 64), ``seed``, ``json_path``, ``progress``."""
    from smartprune.device import autocast
    from smartprune.evaluation import classify
    from smartprune.evaluation.tasks import NotAvailable, get_task, load_split, subsample

    run_spec = RunSpec.of(model, recipe, **options)
    seed, progress, json_path = run_spec.seed, run_spec.progress, run_spec.outputs.json_path
    calib_samples = run_spec.overrides.calib_samples or CALIB_EXAMPLES
    where = resolve_device(run_spec.compute.device)
    dtype = resolve_compute_dtype(run_spec.compute.compute_dtype, where)
    cfg = finetune or classify.FinetuneConfig(seed=seed)
    spec = get_task(task)
    try:
        train, dev = load_split(spec, "train", seed), subsample(load_split(spec, "dev", seed), examples, seed)
    except NotAvailable as exc:
        raise DataError(f"task {task} cannot be fine-tuned here: {exc}") from None
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    loaded = load_model(model)
    clf = classify.SequenceClassifier(loaded.model.to(where), len(spec.labels), seed=cfg.seed)
    seconds = {}
    t = time.perf_counter()
    with autocast(where, dtype):
        training = classify.finetune(clf, loaded.tokenizer, spec, subsample(train, cfg.max_train, cfg.seed), cfg,
                                     progress=progress)
    seconds["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    with autocast(where, dtype):
        dense = classify.evaluate_classifier(clf, loaded.tokenizer, spec, dev, seqlen=cfg.seqlen, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t
    clf.to("cpu")  # the compression engine runs on the CPU
    calib_examples = subsample(train, calib_samples + rec.calibration.eval_samples, seed + 1)
    calib, objective = classify.task_calibration(clf, loaded.tokenizer, spec, calib_examples[:calib_samples],
                                                 calib_examples[calib_samples:], cfg.seqlen)
    clf.head.requires_grad_(False)
    t = time.perf_counter()
    result = compress(loaded.model, loaded.tokenizer, rec, seed=seed, calib=calib, task_objective=objective,
                      progress=progress)
    seconds["compress"] = time.perf_counter() - t
    t = time.perf_counter()
    clf.to(where)
    with autocast(where, dtype):
        after = classify.evaluate_classifier(clf, loaded.tokenizer, spec, dev, seqlen=cfg.seqlen, progress=progress)
    seconds["evaluate"] += time.perf_counter() - t
    clf.to("cpu")
    training = {**training, "budget": cfg.to_dict(), "device": str(where),
                "compute_dtype": str(dtype).removeprefix("torch.")}
    run = ClassifierRun(model, task, rec.name, dense, after, training, result.report, seconds)
    if json_path:
        write_json(json_path, run.to_dict())
    return run


