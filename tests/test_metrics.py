"""Classification metrics against values computed by hand (scikit-learn's definitions)."""

import math

import pytest

from smartprune.evaluation.metrics import classification_metrics, confusion, mcc


def test_binary_metrics_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 0, 0, 1, 0, 1]
    # class 1: tp 3, predicted 4, support 4 -> p 0.75, r 0.75; class 0: tp 3, predicted 4, support 4 -> 0.75
    m = classification_metrics(labels, preds, 2)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1_weighted"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (9 - 1) / sqrt(4*4*4*4) = 0.5
    assert m["mcc"] == pytest.approx(0.5)


def test_weighted_scores_weight_by_support_and_unpredicted_class_scores_zero():
    labels = [0, 0, 0, 1]
    preds = [0, 0, 0, 0]
    m = classification_metrics(labels, preds, 2)
    # class 0: p 3/4, r 1, f1 6/7 (support 3); class 1: never predicted -> p 0, r 0, f1 0 (support 1)
    assert m["precision"] == pytest.approx(0.75 * 3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1_weighted"] == pytest.approx((6 / 7) * 3 / 4)
    assert m["f1"] == 0.0
    assert m["mcc"] == 0.0  # undefined (one predicted class) -> 0, as sklearn


def test_three_class_mcc_and_confusion():
    labels = [0, 1, 2, 0, 1, 2]
    preds = [0, 2, 1, 0, 1, 2]
    assert confusion(labels, preds, 3) == [[2, 0, 0], [0, 1, 1], [0, 1, 1]]
    # c = 4, s = 6, t = p = [2, 2, 2]: (4*6 - 12) / (sqrt(36 - 12) * sqrt(36 - 12)) = 12 / 24
    assert mcc(confusion(labels, preds, 3)) == pytest.approx(0.5)
    m = classification_metrics(labels, preds, 3)
    assert "f1" not in m  # binary F1 only for two classes
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert not math.isnan(m["f1_weighted"])


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 2)
