"""Classification metrics, computed from label vectors by hand (the definitions scikit-learn uses).

- accuracy: share of predictions equal to the label.
- precision / recall / f1 (weighted): each class's score weighted by its support (number of true
  examples), as ``sklearn.metrics.*(average="weighted")``; a class never predicted has precision 0.
- f1 (binary): the F1 of class 1, GLUE's metric for MRPC.
- mcc: Matthews correlation coefficient (multi-class form), GLUE's metric for CoLA; 0 when undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def confusion(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> list[list[int]]:
    """``m[true][pred]`` counts."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    m = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(labels, preds, strict=True):
        m[t][p] += 1
    return m


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def per_class(m: list[list[int]]) -> list[tuple[float, float, float, int]]:
    """(precision, recall, f1, support) of each class."""
    n = len(m)
    out = []
    for c in range(n):
        tp = m[c][c]
        predicted = sum(m[t][c] for t in range(n))
        support = sum(m[c])
        p, r = _div(tp, predicted), _div(tp, support)
        out.append((p, r, _div(2 * p * r, p + r), support))
    return out


def mcc(m: list[list[int]]) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K), as sklearn's matthews_corrcoef."""
    n = len(m)
    s = sum(map(sum, m))
    c = sum(m[k][k] for k in range(n))
    t = [sum(m[k]) for k in range(n)]
    p = [sum(m[i][k] for i in range(n)) for k in range(n)]
    num = c * s - sum(tk * pk for tk, pk in zip(t, p, strict=True))
    den = math.sqrt(s * s - sum(x * x for x in p)) * math.sqrt(s * s - sum(x * x for x in t))
    return _div(num, den)


def classification_metrics(labels: Sequence[int], preds: Sequence[int], n_classes: int) -> dict[str, float]:
    """accuracy, weighted precision / recall / f1, mcc and the binary f1 of class 1 (two classes only)."""
    if not labels:
        raise ValueError("no examples to score")
    m = confusion(labels, preds, n_classes)
    rows = per_class(m)
    total = len(labels)
    out = {
        "accuracy": sum(m[k][k] for k in range(n_classes)) / total,
        "precision": sum(p * s for p, _, _, s in rows) / total,
        "recall": sum(r * s for _, r, _, s in rows) / total,
        "f1_weighted": sum(f * s for _, _, f, s in rows) / total,
        "mcc": mcc(m),
    }
    if n_classes == 2:
        out["f1"] = rows[1][2]
    return out
