"""Identical Row Compression of W_Q and W_K (Eq. 4-16).

A fraction ``rate`` of the ``d_in`` rows of ``W`` (input features, paper orientation) is replaced by
one shared vector ``q``; at ``rate = 1`` the projection is ``s q^T`` with ``s`` each token's feature
sum. Rows are folded in a seeded random order, so a higher rate folds a superset of rows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smartprune.methods.base import Stage, Sublayer, recursive_rates
from smartprune.nn import FoldedProjection
from smartprune.recipes import IRCConfig, StrategyConfig


def least_squares_row(gram: Tensor, weight: Tensor, folded: Tensor) -> Tensor:
    """The shared row that best reproduces the folded part of ``X W`` in least squares:
    ``q = (s^T X_m W_m) / (s^T s)`` with ``s = X_m 1``, from ``G = X^T X``."""
    g = gram[folded][:, folded]
    num = g.sum(0) @ weight[folded].double()
    den = g.sum().clamp_min(1e-30)
    return (num / den).to(weight.dtype)


class IRCStage(Stage):
    cfg: IRCConfig

    def __init__(self, cfg: IRCConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        self.roles = list(cfg.variant)  # "qk" -> ["q", "k"]
        self.original = {r: sub.module(r).dense_weight().clone() for r in self.roles}
        self.order = {r: torch.randperm(w.shape[0], generator=generator) for r, w in self.original.items()}
        self.chosen = {r: int(torch.randint(w.shape[0], (1,), generator=generator)) for r, w in self.original.items()}
        self.rate = 0.0

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        return recursive_rates(self.cfg.rate, strategy)

    def _shared_row(self, role: str, current: nn.Module, folded: Tensor) -> Tensor:
        if self.cfg.init == "fit":
            return least_squares_row(self.sub.input_stats().gram, self.original[role], folded)
        if isinstance(current, FoldedProjection) and current.folded_rows.numel():
            return current.q.detach()  # keep the (already optimized) shared row as more rows join
        if self.cfg.init == "mean-row":
            return self.original[role][folded].mean(0)
        return self.original[role][self.chosen[role]]

    def compress_to(self, rate: float) -> None:
        for role in self.roles:
            current = self.sub.module(role)
            d_in = self.original[role].shape[0]
            n = round(rate * d_in)
            if n == 0:
                continue
            folded = torch.zeros(d_in, dtype=torch.bool)
            folded[self.order[role][:n]] = True
            q = self._shared_row(role, current, folded)
            bias = None if current.bias is None else current.bias.detach()
            self.sub.replace(role, FoldedProjection(current.dense_weight(), bias, folded, q))
        self.rate = rate

    def trainable(self) -> list[nn.Parameter]:
        if self.cfg.train_rest:
            return self.sub.parameters()
        return [self.sub.module(r).q for r in self.roles if isinstance(self.sub.module(r), FoldedProjection)]

    def achieved(self) -> float:
        return self.rate
