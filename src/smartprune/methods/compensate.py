"""Compensation when whole inputs of a projection are removed (feed-forward neurons, attention heads).

Removing neuron j of a feed-forward layer deletes row j of its output projection ``W`` (``d_in x
d_out``, rows = inputs). What those rows contributed is not lost if the kept inputs can stand in for
it: the kept rows are re-fitted in least squares on the calibration tokens,

    min_{W'} sum_t || h_t W - h_{t,K} W' ||^2   =>   W'_K = W_K + (G_KK)^{-1} G_KR W_R,

with ``G = sum_t h_t h_t^T`` the Gram matrix of the projection's inputs, K the kept and R the removed
inputs (the normal equations; FLAP and SlimGPT compensate the same way at this granularity). A removed
input that is a linear combination of kept ones is reconstructed exactly. ``damp`` adds that fraction
of the mean diagonal of ``G_KK`` to its diagonal (SparseGPT's dampening), for kept inputs that are
(nearly) collinear on the calibration tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smartprune.methods.base import Sublayer
from smartprune.methods.oneshot import collect_stats


class Compensation:
    """Compensation of one output projection (the sublayer's role `role`) across a stage's increments.
    Its input's Gram matrix is measured at the first removal, before the masks: removing an input
    (a neuron, a head) leaves the others' values as they were, so one measurement serves every
    increment, unless the stage re-fits weights between increments (`refit`)."""

    def __init__(self, sub: Sublayer, role: str, refit: bool) -> None:
        self.sub, self.role, self.refit = sub, role, refit
        self.gram: Tensor | None = None

    def remove(self, keep: Tensor, gone: Tensor) -> None:
        """Re-fit the kept rows for the rows `gone` is about to remove (call before masking them)."""
        if not bool(gone.any()):
            return
        if self.gram is None or self.refit:
            self.gram = collect_stats(self.sub, [self.role])[self.role].gram
        compensate_rows(self.sub.module(self.role).weight, self.gram, keep, gone)


DAMP = 0.01  # share of the mean diagonal of G_KK added to its diagonal


def damped_kept_gram(gram: Tensor, k: Tensor, damp: float = DAMP) -> Tensor:
    """``G_KK + damp * mean(diag G_KK) I``: the normal equations' matrix of the kept inputs `k`."""
    g_kk = gram[k][:, k]
    return g_kk + damp * g_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(k), dtype=gram.dtype,
                                                                              device=gram.device)


def predictor(gram: Tensor, keep: Tensor, gone: Tensor, damp: float = DAMP) -> Tensor:
    """``B = (G_KK + damp)^{-1} G_KR``: the least-squares prediction of the removed inputs from the kept
    ones (``x_R ~ x_K B``). Compensating a projection is exactly feeding it ``x_K B`` in place of the
    removed inputs (``x_K W_K' = x_K W_K + x_K B W_R``), which is how the structure plan scores a
    compensated candidate without touching the weights (compression/structured.py)."""
    k, r = keep.nonzero().flatten(), gone.nonzero().flatten()
    return torch.linalg.solve(damped_kept_gram(gram, k, damp), gram[k][:, r])


def compensate_rows(weight: Tensor, gram: Tensor, keep: Tensor, gone: Tensor, damp: float = DAMP) -> None:
    """Re-fit the kept rows of `weight` (rows = inputs) in place for the rows `gone` is about to remove:
    ``W_K += (G_KK + damp * mean(diag G_KK) I)^{-1} G_KR W_R``."""
    k, r = keep.nonzero().flatten(), gone.nonzero().flatten()
    if not len(k) or not len(r):
        return
    g = gram.to(weight.device)
    w = weight.detach().double()
    update = torch.linalg.solve(damped_kept_gram(g, k, damp), g[k][:, r] @ w[r])
    with torch.no_grad():
        weight[k] += update.to(weight.dtype)
