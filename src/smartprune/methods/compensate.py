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
from torch import Tensor, nn

from smartprune.methods.base import Sublayer
from smartprune.modules.masked import forward_pre_hooks, run_in_chunks


def input_gram(sub: Sublayer, module: nn.Module) -> Tensor:
    """``sum_t x_t x_t^T`` (float64) of `module`'s input while the sublayer runs on its calibration input."""
    width = module.weight.shape[0]
    gram = torch.zeros(width, width, dtype=torch.float64, device=module.weight.device)

    def hook(_module, args) -> None:
        x = args[0].detach().reshape(-1, width).double().to(gram.device)
        gram.addmm_(x.T, x)

    with forward_pre_hooks([(module, hook)]):
        run_in_chunks(sub.forward, sub.inputs)
    return gram


def compensate_rows(weight: Tensor, gram: Tensor, keep: Tensor, gone: Tensor, damp: float = 0.01) -> None:
    """Re-fit the kept rows of `weight` (rows = inputs) in place for the rows `gone` is about to remove:
    ``W_K += (G_KK + damp * mean(diag G_KK) I)^{-1} G_KR W_R``."""
    k, r = keep.nonzero().flatten(), gone.nonzero().flatten()
    if not len(k) or not len(r):
        return
    g = gram.to(weight.device)
    g_kk = g[k][:, k]
    g_kk = g_kk + damp * g_kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(k), dtype=g.dtype, device=g.device)
    w = weight.detach().double()
    update = torch.linalg.solve(g_kk, g[k][:, r] @ w[r])
    with torch.no_grad():
        weight[k] += update.to(weight.dtype)
