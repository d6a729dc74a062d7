"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight updates.

Columns (inputs) are processed left to right in blocks of ``blocksize``. Within a block the mask is
chosen adaptively from ``w^2 / [H^-1]_jj^2``; each pruned column's error is spread over the columns
not yet processed through the upper Cholesky factor of ``H^-1`` (``H = X^T X`` plus dampening of a
fraction of its mean diagonal), lazily for the columns beyond the block. Inputs that never fire
(zero Hessian diagonal) get a unit diagonal and zero weights, so a singular Hessian stays solvable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from smartprune.methods.base import InputStats
from smartprune.methods.config import option
from smartprune.methods.oneshot import OneShotStage, PruneConfig
from smartprune.methods.pruning import lowest_in_matrix, lowest_n_of_m
from smartprune.modules.masked import Projection


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    """SparseGPT (Frantar & Alistarh 2023): OBS pruning with the layer Hessian X^T X."""

    blocksize: int = option(128, "columns per lazy-update block", lo=1, hi=1_000_000)
    damp: float = option(0.01, "dampening, as a fraction of the mean Hessian diagonal", lo=0.0, hi=10.0)

def inverse_hessian_factor(gram: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """The upper Cholesky factor of ``(H + damping)^-1`` (float64), and the inputs that never fire
    (zero Hessian diagonal; they get a unit diagonal so the inverse exists)."""
    h = gram.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


def sparsegpt(weight_t: Tensor, gram: Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              blocksize: int = 128, damp: float = 0.01, fixed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Prune `weight_t` (d_out, d_in) given the input Gram matrix; returns (new weights, prune mask).
    With `fixed` (a prune mask) the mask is not chosen, only the surviving weights are updated."""
    cols = weight_t.shape[1]
    if nm is not None and (blocksize % nm[1] or cols % nm[1]):
        raise ValueError(f"N:M with M={nm[1]} needs blocksize ({blocksize}) and inputs ({cols}) divisible by M")
    hinv, dead = inverse_hessian_factor(gram, damp)
    w, prune = _sweep(weight_t.detach().double()[None], hinv, dead, [sparsity], nm, blocksize,
                      None if fixed is None else fixed[None])
    return w[0].to(weight_t.dtype), prune[0]


def sparsegpt_at_rates(weight_t: Tensor, gram: Tensor, rates: list[float], blocksize: int = 128,
                       damp: float = 0.01) -> list[Tensor]:
    """`weight_t` (d_out, d_in) pruned by SparseGPT at each of `rates`, in one sweep: each version is the
    one `sparsegpt` gives, but the inverse Hessian is factored once and the column loop runs once for
    all of them (each version's rows stacked; an allocation measures every matrix at several rates)."""
    hinv, dead = inverse_hessian_factor(gram, damp)
    w = weight_t.detach().double()[None].expand(len(rates), -1, -1)
    new, _ = _sweep(w, hinv, dead, rates, None, blocksize, None)
    return [v.to(weight_t.dtype) for v in new]


def _sweep(w: Tensor, hinv: Tensor, dead: Tensor, sparsities: list[float], nm: tuple[int, int] | None,
           blocksize: int, fixed: Tensor | None) -> tuple[Tensor, Tensor]:
    """The OBS sweep over the columns of `w` (versions, d_out, d_in; float64) with the factor `hinv`:
    version v reaches ``round(sparsities[v] * d_out * d_in)`` zeros (or N:M, or the `fixed` masks)."""
    w = w.clone()
    versions, rows, cols = w.shape
    w[:, :, dead] = 0.0
    prune = torch.zeros(versions, rows, cols, dtype=torch.bool, device=w.device)
    totals = [round(s * rows * cols) for s in sparsities]
    # Within a block too, the columns are updated lazily: `inner` columns one by one, then the rest of
    # the block by one matrix product (the same sums in another order; the per-column updates over the
    # whole block were most of the time). A multiple of M, so no N:M group straddles two inner blocks.
    inner = 16 if nm is None else nm[1] * max(1, 16 // nm[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        w1 = w[:, :, i1:i2].permute(2, 0, 1).contiguous()  # (columns, versions, rows): a column is contiguous
        err1 = torch.zeros_like(w1)
        if fixed is not None:
            mask1 = fixed[:, :, i1:i2].to(w.device).permute(2, 0, 1)
        elif nm is None:  # this block's share of the exact total, chosen adaptively within the block
            mask1 = torch.stack([lowest_in_matrix(w[v, :, i1:i2].pow(2) / d.pow(2),
                                                  round(t * i2 / cols) - round(t * i1 / cols))
                                 for v, t in enumerate(totals)]).permute(2, 0, 1)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        # per column: err = w / d where pruned (0 where kept), the later columns of the inner block
        # minus err * hinv row, the column itself zeroed where pruned (few calls: the loop is bound by them)
        pruned = mask1.to(w1.dtype)
        dl = d.tolist()
        cols1, errs, prunes, masks = w1.unbind(0), err1.unbind(0), pruned.unbind(0), mask1.unbind(0)
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            for i in range(j1, j2):
                if fixed is None and nm is not None and i % nm[1] == 0:
                    score = (w1[i:i + nm[1]].pow(2) / d[i:i + nm[1], None, None].pow(2)).permute(1, 2, 0)
                    chosen = lowest_n_of_m(score.reshape(-1, nm[1]), *nm).view_as(score).permute(2, 0, 1)
                    mask1[i:i + nm[1]] = chosen
                    pruned[i:i + nm[1]] = chosen
                torch.mul(cols1[i], prunes[i], out=errs[i]).div_(dl[i])
                w1[i:j2].addcmul_(hinv1[i, i:j2, None, None], errs[i], value=-1.0)
                cols1[i].masked_fill_(masks[i], 0.0)  # exactly zero where pruned
            # the rest of the block gets these columns' errors in one product, not one per column
            w1[j2:] -= torch.tensordot(hinv1[j1:j2, j2:], err1[j1:j2], dims=([0], [0]))
        w[:, :, i1:i2] = w1.permute(1, 2, 0)
        prune[:, :, i1:i2] = mask1.permute(1, 2, 0)
        w[:, :, i2:] -= err1.permute(1, 2, 0) @ hinv[i1:i2, i2:]
    return w, prune


class SparseGPTStage(OneShotStage):
    cfg: SparseGPTConfig

    def prune(self, role: str, proj: Projection, stats: InputStats | None) -> Tensor:
        new_t, prune = sparsegpt(proj.weight.detach().T, stats.gram, self.sparsity_of(role), self.cfg.nm,
                                 self.cfg.blocksize, self.cfg.damp)
        with torch.no_grad():
            proj.weight.copy_(new_t.T)
        return prune
