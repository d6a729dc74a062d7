"""Identical Row Compression of W_Q and W_K (Eq. 4-16).

A fraction ``rate`` of the ``d_in`` rows of ``W`` (input features, paper orientation) is replaced by
one shared vector ``q``; at ``rate = 1`` the projection is ``s q^T`` with ``s`` each token's feature
sum. Rows are folded in a seeded random order, so a higher rate folds a superset of rows.

``orientation: output`` is the other reading of the paper's damaged equations ("a unit vector of size
one by d"; "the product ... is simply the scalar"): the *columns* are folded, every folded output
feature is the same combination ``x . q`` (``W = q 1^T`` at rate 1). Its least-squares shared column
is the mean of the folded columns whatever the inputs (each column's error ``X (q - w_j)`` is minimised
in sum by the mean), so ``init: fit`` and ``mean-row`` coincide there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from smartprune.methods.base import Stage, Sublayer, recursive_rates
from smartprune.methods.config import FitConfig, StrategyConfig, option
from smartprune.modules.masked import FOLDED, ColumnFoldedProjection, FoldedProjection


@dataclass(frozen=True)
class IRCConfig(FitConfig):
    """Identical Row Compression of W_Q and/or W_K."""

    rate_field: ClassVar[str] = "rate"  # the field a sweep varies

    variant: str = option("qk", "which matrices: q | k | qk", choices=("q", "k", "qk"))
    rate: float = option(1.0, "fraction of rows replaced by the shared row (1 = full IRC)", lo=0.0, hi=1.0)
    init: str = option("random-row", "shared row: random-row | mean-row | fit (least squares)",
                       choices=("random-row", "mean-row", "fit"))
    orientation: str = option("input", "which reading of IRC: input (rows folded, W = 1 q^T: each token's feature "
                              "sum times q) | output (columns folded, W = q 1^T: every output is x . q)",
                              choices=("input", "output"))
    train_rest: bool = option(True, "also optimize the attention's other weights after the fold")

def least_squares_row(gram: Tensor, weight: Tensor, folded: Tensor) -> Tensor:
    """The shared row that best reproduces the folded part of ``X W`` in least squares:
    ``q = (s^T X_m W_m) / (s^T s)`` with ``s = X_m 1``, from ``G = X^T X``."""
    g = gram[folded][:, folded]
    num = g.sum(0) @ weight[folded].double()
    den = g.sum().clamp_min(1e-30)
    return (num / den).to(weight.dtype)


# orientation -> (module class, axis of W that is folded: 0 = rows / input features, 1 = columns / outputs)
ORIENTATIONS = {"input": (FoldedProjection, 0), "output": (ColumnFoldedProjection, 1)}


class IRCStage(Stage):
    cfg: IRCConfig

    def __init__(self, cfg: IRCConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        self.fold_class, self.axis = ORIENTATIONS[cfg.orientation]
        self.roles = list(cfg.variant)  # "qk" -> ["q", "k"]
        self.original = {r: sub.module(r).dense_weight().clone() for r in self.roles}
        self.order = {r: torch.randperm(w.shape[self.axis], generator=generator) for r, w in self.original.items()}
        self.chosen = {r: int(torch.randint(w.shape[self.axis], (1,), generator=generator))
                       for r, w in self.original.items()}
        self.rate = 0.0

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        return recursive_rates(self.cfg.rate, strategy)

    def _shared_row(self, role: str, current: nn.Module, folded: Tensor) -> Tensor:
        w = self.original[role] if self.axis == 0 else self.original[role].t()  # the foldable vectors as rows
        if self.cfg.init == "fit":  # least squares; in the column reading that is the mean (module docstring)
            return least_squares_row(self.sub.input_stats().gram, w, folded) if self.axis == 0 else w[folded].mean(0)
        if isinstance(current, self.fold_class) and current.n_folded:
            return current.q.detach()  # keep the (already optimized) shared vector as more join
        if self.cfg.init == "mean-row":
            return w[folded].mean(0)
        return w[self.chosen[role]]

    def compress_to(self, rate: float) -> None:
        for role in self.roles:
            current = self.sub.module(role)
            n_axis = self.original[role].shape[self.axis]
            n = round(rate * n_axis)
            if n == 0:
                continue
            folded = torch.zeros(n_axis, dtype=torch.bool)
            folded[self.order[role][:n]] = True
            q = self._shared_row(role, current, folded)
            bias = None if current.bias is None else current.bias.detach()
            self.sub.replace(role, self.fold_class(current.dense_weight(), bias, folded, q))
        self.rate = rate

    def trainable(self) -> list[nn.Parameter]:
        if self.cfg.train_rest:
            return self.sub.parameters()
        return [self.sub.module(r).q for r in self.roles if isinstance(self.sub.module(r), FOLDED)]

    def achieved(self) -> float:
        return self.rate
