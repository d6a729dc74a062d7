"""Every quality evaluation behind one name space: perplexity texts, classification tasks, generation.

A task name maps to a `TaskKind` that runs it on a loaded model and names the metrics a table
shows; `evaluate` runs several on one model and returns ``{task: {metric: value, ...}}``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from smartprune.data import EVAL_TEXTS
from smartprune.errors import DataError, did_you_mean
from smartprune.evaluation import classify, lm_eval_tasks
from smartprune.evaluation.classify import FinetuneConfig, SequenceClassifier
from smartprune.evaluation.generation import GenerationConfig, generation_quality, reference_vocabulary
from smartprune.evaluation.perplexity import check_limit, perplexity
from smartprune.evaluation.tasks import TASKS, NotAvailable, load_split, subsample

log = logging.getLogger(__name__)
MODES = ("zero-shot", "finetune")


@dataclass
class EvalSettings:
    """How each kind of task is run; the same for every model of one comparison."""

    seqlen: int = 1024  # perplexity window
    stride: int | None = None  # sliding-window perplexity
    limit: int | None = None  # first N perplexity windows
    examples: int | None = None  # at most N dev examples per classification task (seeded subset)
    mode: str = "zero-shot"  # classification: zero-shot | finetune
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch_size: int = 8
    seed: int = 0
    lm_eval_include: str | None = None  # a folder of local lm-eval task YAMLs (lm-eval's --include_path)
    lm_eval_allow_code: bool = False  # let that folder's YAMLs import Python (`!function`): off, it is data

    def __post_init__(self) -> None:
        check_limit(self.limit)
        if self.examples is not None and self.examples < 1:
            raise DataError(f"examples must be a positive count, got {self.examples}")
        if self.mode not in MODES:
            raise DataError(f"unknown classification mode '{self.mode}'{did_you_mean(self.mode, MODES)}; "
                            f"known: {', '.join(MODES)}")


@dataclass(frozen=True)
class TaskKind:
    run: Callable  # (loaded model, task name, settings, progress) -> result dict
    shown: Callable[[dict], list[str]]  # the metric names of a result that a table shows


def _perplexity(loaded, name: str, s: EvalSettings, progress: bool) -> dict:
    return perplexity(loaded.model, loaded.tokenizer, name, seqlen=s.seqlen, stride=s.stride, limit=s.limit,
                      progress=progress).to_dict()


def _classification(loaded, name: str, s: EvalSettings, progress: bool) -> dict:
    task = TASKS[name]
    try:
        dev = subsample(load_split(task, "dev", s.seed), s.examples, s.seed)
        train = load_split(task, "train", s.seed) if s.mode == "finetune" else None
    except NotAvailable as exc:
        log.warning("%s (%s): not available: %s", name, s.mode, exc)
        return {"available": False, "reason": str(exc), "mode": s.mode}
    start = time.perf_counter()
    if s.mode == "zero-shot":
        out = classify.zero_shot(loaded.model, loaded.tokenizer, task, dev, batch_size=s.batch_size,
                                 progress=progress)
    else:  # a copy: fine-tuning must not leak into the next task on the same model
        clf = SequenceClassifier(copy.deepcopy(loaded.model), len(task.labels), seed=s.finetune.seed)
        budget = subsample(train, s.finetune.max_train, s.finetune.seed)
        training = classify.finetune(clf, loaded.tokenizer, task, budget, s.finetune, progress=progress)
        out = classify.evaluate_classifier(clf, loaded.tokenizer, task, dev, seqlen=s.finetune.seqlen,
                                           progress=progress)
        out["training"] = {**training, "budget": s.finetune.to_dict()}
        del clf
    return {"available": True, **out, "seconds": time.perf_counter() - start}


def _generation(loaded, name: str, s: EvalSettings, progress: bool) -> dict:
    start = time.perf_counter()
    out = generation_quality(loaded.model, loaded.tokenizer, s.generation, reference_vocabulary())
    return {**out, "seconds": time.perf_counter() - start}


def _lm_eval(loaded, name: str, s: EvalSettings, progress: bool) -> dict:
    start = time.perf_counter()
    out = lm_eval_tasks.run(loaded.model, loaded.tokenizer, name, include=s.lm_eval_include, limit=s.examples,
                            batch_size=s.batch_size, seed=s.seed)
    return {**out, "seconds": time.perf_counter() - start}


LM_EVAL = TaskKind(_lm_eval, lm_eval_tasks.shown)


def _fixed(*names: str) -> Callable[[dict], list[str]]:
    return lambda result: [m for m in names if isinstance(result.get(m), (int, float))]


def _kinds() -> dict[str, TaskKind]:
    ppl = TaskKind(_perplexity, _fixed("perplexity"))
    cls = TaskKind(_classification, _fixed("accuracy", "precision", "recall", "f1_weighted", "loss", "mcc", "f1"))
    gen = TaskKind(_generation, lambda result: [k for k in result if "@" in k])  # metric@length, any lengths
    return {**dict.fromkeys(EVAL_TEXTS, ppl), **dict.fromkeys(TASKS, cls), "generation": gen}


def kinds_of(names: list[str]) -> set[str]:
    """Which kinds of task `names` holds: perplexity, classification, generation, lm-eval (an unknown name
    raises, as in check_tasks)."""
    return {"lm-eval" if lm_eval_tasks.is_lm_eval(n) else "perplexity" if n in EVAL_TEXTS else
            "classification" if n in TASKS else "generation" for n in _known(names)}


def task_names() -> list[str]:
    return list(_kinds())


def check_tasks(names: list[str], lm_eval_include: str | None = None, allow_code: bool = False) -> list[str]:
    """`names` without blanks (a bare name after an `lm-eval:` one is lm-eval's too); an unknown one
    raises with a suggestion."""
    names = _known(names)
    lm_eval_tasks.check(names, lm_eval_include, allow_code)
    return names


def _known(names: list[str]) -> list[str]:
    """`names` without blanks, expanded (a bare name after an `lm-eval:` one is lm-eval's too); one that is
    neither ours nor lm-eval's raises with a suggestion."""
    kinds = _kinds()
    names = lm_eval_tasks.expand([n.strip() for n in names if n.strip()], set(kinds))
    if not names:
        raise DataError("no tasks given")
    for n in names:
        if n not in kinds and not lm_eval_tasks.is_lm_eval(n):
            raise DataError(f"unknown task '{n}'{did_you_mean(n, kinds)}; known: {', '.join(kinds)}, or "
                            "lm-eval:TASK (lm-evaluation-harness)")
    return names


def _kind(task: str) -> TaskKind:
    return LM_EVAL if lm_eval_tasks.is_lm_eval(task) else _kinds()[task]


def shown_metrics(task: str, result: dict) -> list[str]:
    return _kind(task).shown(result)


def evaluate(loaded, tasks: list[str], settings: EvalSettings, *, progress: bool = True) -> dict[str, dict]:
    """``{task: result}`` for one loaded model."""
    return {t: _kind(t).run(loaded, t, settings, progress)
            for t in check_tasks(tasks, settings.lm_eval_include, settings.lm_eval_allow_code)}
