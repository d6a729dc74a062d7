"""Diagonal Weight Compression: diagonals, triangles and the shrinking band, by hand."""

import torch

from smartprune.methods.dwc import diagonal_rows, removal_order


def _mask(shape, diag, variant, rate):
    order = removal_order(shape, diag, variant)
    keep = torch.ones(shape[0] * shape[1], dtype=torch.bool)
    keep[order[:round(rate * order.numel())]] = False
    return keep.view(shape)


def test_both_at_full_rate_keeps_only_the_diagonal():
    assert torch.equal(_mask((4, 4), torch.arange(4), "both", 1.0), torch.eye(4, dtype=torch.bool))


def test_lower_and_upper_remove_their_strict_triangle():
    lower = _mask((4, 4), torch.arange(4), "lower", 1.0)
    upper = _mask((4, 4), torch.arange(4), "upper", 1.0)
    ones = torch.ones(4, 4, dtype=torch.bool)
    assert torch.equal(lower, torch.triu(ones))  # row i > column j removed
    assert torch.equal(upper, torch.tril(ones))


def test_partial_rate_removes_the_farthest_entries_first():
    # 12 off-diagonal entries; half of them are the 6 at distance 2 or 3: a band of width 1 is left.
    keep = _mask((4, 4), torch.arange(4), "both", 0.5)
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(keep, (i - j).abs() <= 1)
    # one more step to 2/12: only the two corners at distance 3 are gone
    keep = _mask((4, 4), torch.arange(4), "both", 2 / 12)
    assert torch.equal(~keep, (i - j).abs() == 3)


def test_rectangular_generalized_diagonal():
    w = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.2], [2.0, 0.0, 0.0],
                      [0.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.1]])
    assert diagonal_rows(w, "strided", None).tolist() == [0, 2, 4]
    norms = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 10.0])
    assert diagonal_rows(w, "largest", norms).tolist() == [2, 3, 5]  # |W| * ||X_i||: 0.1*10 > 0.2*1
    keep = _mask((6, 3), torch.tensor([2, 3, 5]), "both", 1.0)
    assert keep.sum() == 3 and keep[2, 0] and keep[3, 1] and keep[5, 2]
    keep = _mask((6, 3), torch.tensor([2, 3, 5]), "lower", 1.0)
    assert keep[:, 0].tolist() == [True, True, True, False, False, False]  # rows below d(0)=2 removed
