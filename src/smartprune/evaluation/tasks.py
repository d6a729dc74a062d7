"""Text-classification tasks: where their data is, how to read it, and how to prompt for them.

Each task names its files inside the data folder, a reader for one file, the label names, the
verbalized labels for zero-shot scoring and a fixed prompt. A split that is absent here (QNLI and
MNLI train, all of QQP) is *not available*, with the reason; the caller reports that, never skips it.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smartprune.errors import DataError, did_you_mean
from smartprune.paths import DATA_ENV, data_dir


@dataclass(frozen=True)
class Example:
    a: str
    b: str | None
    label: int


class NotAvailable(Exception):
    """A task or split has no data here; the message says why."""


def _rows(path: Path, header: bool) -> list[list[str]]:
    # GLUE TSVs are not CSV-quoted (MRPC sentences contain bare '"'); the MRPC header starts with a BOM.
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    return rows[1:] if header else rows


def _columns(a: int, b: int | None, label: int, labels: tuple[str, ...], header: bool = True) -> Callable:
    """A reader taking text column `a` (and `b`) and the label column, labels given by name or index."""
    def read(path: Path) -> list[Example]:
        out = []
        for r in _rows(path, header):
            raw = r[label]
            y = labels.index(raw) if raw in labels else int(raw)
            out.append(Example(r[a], r[b] if b is not None else None, y))
        return out
    return read


def _mnli(path: Path) -> list[Example]:
    labels = ("entailment", "neutral", "contradiction")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(r["premise"], r["hypothesis"], labels.index(r["label"])) for r in rows]


def _sms(path: Path) -> list[Example]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split("\t", 1)
            out.append(Example(text, None, ("ham", "spam").index(label)))
    return out


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    labels: tuple[str, ...]  # label names, by label index
    verbalizers: tuple[str, ...]  # continuation scored for each label (zero-shot)
    prompt: str  # format string over {a} and {b}, ends where the verbalizer starts
    reader: Callable[[Path], list[Example]] | None
    files: dict[str, tuple[str, ...]]  # split -> path parts; "all" = one file split 80/20 here
    glue_metric: str = "accuracy"  # the task's headline metric: accuracy, mcc or f1
    missing: str = ""  # why a task has no data at all

    def render(self, ex: Example) -> str:
        return self.prompt.format(a=ex.a.strip(), b=(ex.b or "").strip())


YES_NO = (" no", " yes")
TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cola", "CoLA", ("unacceptable", "acceptable"), YES_NO,
         "Sentence: {a}\nQuestion: Is this sentence grammatically correct?\nAnswer:",
         _columns(3, None, 1, (), header=False), {"train": ("glue", "CoLA", "train.tsv"),
                                                  "dev": ("glue", "CoLA", "dev.tsv")}, "mcc"),
    Task("sst2", "SST-2", ("negative", "positive"), (" negative", " positive"),
         "Review: {a}\nSentiment:", _columns(0, None, 1, ()),
         {"train": ("glue", "SST-2", "train.tsv"), "dev": ("glue", "SST-2", "dev.tsv")}),
    Task("mrpc", "MRPC", ("not_equivalent", "equivalent"), YES_NO,
         "Sentence 1: {a}\nSentence 2: {b}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
         _columns(3, 4, 0, ()), {"train": ("glue", "MRPC", "train.tsv"), "dev": ("glue", "MRPC", "dev.tsv")}, "f1"),
    Task("rte", "RTE", ("entailment", "not_entailment"), (" True", " False"),
         "{a}\nQuestion: {b} True or False?\nAnswer:", _columns(1, 2, 3, ("entailment", "not_entailment")),
         {"train": ("glue", "RTE", "train.tsv"), "dev": ("glue", "RTE", "dev.tsv")}),
    Task("qnli", "QNLI", ("entailment", "not_entailment"), (" yes", " no"),
         "Question: {a}\nSentence: {b}\nQuestion: Does the sentence answer the question?\nAnswer:",
         _columns(1, 2, 3, ("entailment", "not_entailment")),
         {"train": ("glue", "QNLI", "train.tsv"), "dev": ("glue", "QNLI", "dev.tsv")}),
    Task("mnli", "MNLI (matched)", ("entailment", "neutral", "contradiction"), (" True", " Neither", " False"),
         "{a}\nQuestion: {b} True, False or Neither?\nAnswer:", _mnli,
         {"train": ("glue", "MNLI", "train.jsonl"), "dev": ("glue", "MNLI", "dev_matched.jsonl")}),
    Task("sms", "SMS Spam", ("ham", "spam"), YES_NO, "Message: {a}\nQuestion: Is this message spam?\nAnswer:",
         _sms, {"all": ("sms", "SMSSpamCollection")}),
    Task("qqp", "QQP", ("not_duplicate", "duplicate"), YES_NO, "", None, {},
         missing="QQP is not in the data folder (neither train nor dev)"),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown classification task '{name}'{did_you_mean(name, TASKS)}; known: {', '.join(TASKS)}")
    return TASKS[name]


def stratified_split(examples: list[Example], test_share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Per label, a seeded shuffle; the first `test_share` of each label goes to the test part."""
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted({e.label for e in examples}):
        group = [e for e in examples if e.label == label]
        rng.shuffle(group)
        k = round(len(group) * test_share)
        test += group[:k]
        train += group[k:]
    return train, test


def load_split(task: Task, split: str, seed: int = 0) -> list[Example]:
    """The `split` ("train" or "dev") of `task`; raises NotAvailable with the reason when absent."""
    if task.missing:
        raise NotAvailable(task.missing)
    root = data_dir()
    if "all" in task.files:  # one labelled file: seeded stratified 80/20 train/dev split
        path = root.joinpath(*task.files["all"])
        if not path.is_file():
            raise NotAvailable(f"{path} not found (set {DATA_ENV})")
        train, dev = stratified_split(task.reader(path), 0.2, seed)
        return train if split == "train" else dev
    path = root.joinpath(*task.files[split])
    if not path.is_file():
        raise NotAvailable(f"no {split} split here ({'/'.join(task.files[split])} not in {root})")
    examples = task.reader(path)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most `limit` examples, a seeded random subset in file order (files are often sorted by source)."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]
