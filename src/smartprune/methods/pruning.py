"""Mask selection shared by the one-shot baselines. Scores are laid out as the published methods
lay out weights: one row per output, one column per input (the transpose of our ``W``). Every
function returns a boolean *prune* mask (True = removed) with exactly the requested counts."""

from __future__ import annotations

import torch
from torch import Tensor


def spread(total: int, parts: int) -> Tensor:
    """`total` split over `parts` as evenly as possible (the first ones get the remainder)."""
    base, extra = divmod(total, parts)
    return torch.full((parts,), base, dtype=torch.long) + (torch.arange(parts) < extra).long()


def lowest_in_matrix(score: Tensor, count: int) -> Tensor:
    """The `count` lowest scores of the whole matrix."""
    # By threshold (kthvalue, a few times faster than top-k) where that names exactly `count` entries;
    # where ties straddle the threshold, top-k's choice among them: weights upcast from a quantized
    # file take few distinct values, so such ties occur, and another choice among them would change
    # every number measured so far. Either way the set is top-k's.
    flat = score.flatten()
    if 0 < count < flat.numel():
        at_most = flat <= flat.kthvalue(count).values
        if int(at_most.sum()) == count:
            return at_most.view_as(score)
    prune = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count:
        prune[torch.topk(flat, count, largest=False).indices] = True
    return prune.view_as(score)


def lowest_per_row(score: Tensor, sparsity: float) -> Tensor:
    """The lowest scores of each row; ``round(sparsity * numel)`` in all, spread evenly over rows."""
    counts = spread(round(sparsity * score.numel()), score.shape[0]).to(score.device)
    rank = score.argsort(dim=1).argsort(dim=1)  # 0 = lowest in its row
    return rank < counts[:, None]


def lowest_n_of_m(score: Tensor, n: int, m: int) -> Tensor:
    """N:M: the `n` lowest of every group of `m` consecutive inputs in each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"an N:M pattern needs the input size ({cols}) to be a multiple of M={m}")
    groups = score.reshape(rows, cols // m, m)
    prune = torch.zeros_like(groups, dtype=torch.bool)
    prune.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return prune.view(rows, cols)
