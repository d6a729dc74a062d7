"""Diagonal Weight Compression of W_V (Eq. 17-19).

Each output column ``j`` has a diagonal input row ``d(j)``: ``j`` itself for a square ``W_V``; for a
rectangular one (grouped-query attention, ``d_out < d_in``) the input with the largest
calibration-weighted ``|W_ij| * ||X_i||`` (``largest``) or ``floor(j * d_in / d_out)`` (``strided``).
``lower`` removes entries below the diagonal (``i > d(j)``), ``upper`` those above, ``both`` all
off-diagonal ones. At ``rate`` the removable entries farthest from the diagonal go first (a band
that shrinks), so ``rate = 1`` with ``both`` leaves ``W_V = diag(v)``: ``V = X * v``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from smartprune.methods.base import Stage, Sublayer, recursive_rates
from smartprune.methods.config import FitConfig, StrategyConfig, option


@dataclass(frozen=True)
class DWCConfig(FitConfig):
    """Diagonal Weight Compression of W_V."""

    rate_field: ClassVar[str] = "rate"  # the field a sweep varies

    variant: str = option("both", "which triangle is removed: lower | upper | both", choices=("lower", "upper", "both"))
    rate: float = option(1.0, "fraction of the removable entries zeroed, farthest from the diagonal first",
                         lo=0.0, hi=1.0)
    rect_diagonal: str = option("largest", "input read by each column of a rectangular W_V: largest | strided",
                                choices=("largest", "strided"))
    train_rest: bool = option(True, "also optimize the attention's other weights after the fold")

def diagonal_rows(weight: Tensor, rule: str, feature_norms: Tensor | None) -> Tensor:
    """The input row ``d(j)`` each output column keeps on its diagonal."""
    d_in, d_out = weight.shape
    if d_in == d_out:
        return torch.arange(d_out)
    if rule == "strided" or feature_norms is None:
        return torch.arange(d_out) * d_in // d_out
    return (weight.abs() * feature_norms.to(weight.dtype)[:, None]).argmax(0)


def removal_order(weight_shape: tuple[int, int], diag: Tensor, variant: str) -> Tensor:
    """Flat indices of the removable entries, farthest from the diagonal first (ties: row-major)."""
    d_in = weight_shape[0]
    offset = torch.arange(d_in)[:, None] - diag[None, :]
    removable = {"lower": offset > 0, "upper": offset < 0, "both": offset != 0}[variant].flatten()
    idx = removable.nonzero().flatten()
    far_first = torch.argsort(-offset.abs().flatten()[idx], stable=True)
    return idx[far_first]


class DWCStage(Stage):
    cfg: DWCConfig

    def __init__(self, cfg: DWCConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        w = sub.module("v").dense_weight()
        rectangular_largest = w.shape[0] != w.shape[1] and cfg.rect_diagonal == "largest"
        norms = sub.input_stats().feature_norms if rectangular_largest else None
        self.diag = diagonal_rows(w, cfg.rect_diagonal, norms).cpu()  # index bookkeeping stays on the CPU
        self.order = removal_order(tuple(w.shape), self.diag, cfg.variant)
        self.rate = 0.0

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        return recursive_rates(self.cfg.rate, strategy)

    def compress_to(self, rate: float) -> None:
        v = self.sub.module("v")
        keep = torch.ones(v.weight.numel(), dtype=torch.bool)
        keep[self.order[:round(rate * self.order.numel())]] = False
        v.set_mask(keep.view_as(v.weight))
        self.rate = rate

    def trainable(self) -> list[nn.Parameter]:
        if self.cfg.train_rest:
            return self.sub.parameters()
        v = self.sub.module("v")
        return [p for p in (v.weight, v.bias) if p is not None]

    def achieved(self) -> float:
        return self.rate
