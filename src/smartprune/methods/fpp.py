"""Forward Propagation Pruning (Algorithm 2) of embedding and feed-forward matrices.

Iteration ``it`` zeroes, among the still-alive entries of each matrix, ``p_pos * N`` positive and
``p_neg * N`` negative weights (``N`` the matrix's size) and freezes them for good; the fit then
re-optimizes the survivors. ``magnitude`` (default) takes the weights of each sign closest to zero;
``literal`` takes the paper's words at face value: the largest positive and the most negative.
The last iteration is trimmed so the target sparsity is met exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smartprune.errors import RecipeError
from smartprune.methods.base import Stage, Sublayer
from smartprune.nn import Maskable
from smartprune.recipes import FPPConfig, StrategyConfig


def sign_balanced_mask(weight: Tensor, mask: Tensor | None, n_pos: int, n_neg: int, criterion: str) -> Tensor:
    """A new mask (True = alive) with `n_pos` more non-negative and `n_neg` more negative entries
    removed. When one sign has too few alive entries, the other sign makes up the difference."""
    w = weight.detach().flatten()
    alive = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.flatten().clone()
    pos = (alive & (w >= 0)).nonzero().flatten()
    neg = (alive & (w < 0)).nonzero().flatten()
    have_pos, have_neg = pos.numel(), neg.numel()
    n_pos, n_neg = (min(have_pos, n_pos + max(0, n_neg - have_neg)),
                    min(have_neg, n_neg + max(0, n_pos - have_pos)))
    # magnitude: smallest positives, least negative negatives; literal: the extremes of each sign.
    smallest = criterion == "magnitude"
    if n_pos:
        alive[pos[torch.topk(w[pos], n_pos, largest=not smallest).indices]] = False
    if n_neg:
        alive[neg[torch.topk(w[neg], n_neg, largest=smallest).indices]] = False
    return alive.view_as(weight)


def fpp_rates(cfg: FPPConfig) -> list[float]:
    """Cumulative sparsity after each iteration: ``it * (p_pos + p_neg)``, capped at the target."""
    per_it = cfg.p_pos + cfg.p_neg
    if cfg.target_sparsity <= 0:
        return []
    if per_it <= 0:
        raise RecipeError("FPP: p_pos + p_neg must be above 0 to reach target_sparsity "
                          f"{cfg.target_sparsity}")
    rates: list[float] = []
    for it in range(1, cfg.max_it + 1):
        rates.append(min(cfg.target_sparsity, it * per_it))
        if rates[-1] >= cfg.target_sparsity - 1e-12:
            break
    return rates


class FPPStage(Stage):
    cfg: FPPConfig

    def __init__(self, cfg: FPPConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        self.targets: list[Maskable] = [m for m in sub.modules().values() if isinstance(m, Maskable)]
        self.rate = 0.0

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        return fpp_rates(self.cfg)  # FPP is iterative by nature, whatever the strategy

    def compress_to(self, rate: float) -> None:
        share = self.cfg.p_pos / (self.cfg.p_pos + self.cfg.p_neg)
        for m in self.targets:
            n = m.weight.numel()
            removed = n - m.alive()
            new = max(0, round(rate * n) - removed)
            n_pos = round(new * share)
            m.set_mask(sign_balanced_mask(m.weight, m.mask, n_pos, new - n_pos, self.cfg.criterion))
        self.rate = rate

    def trainable(self) -> list[nn.Parameter]:
        return self.sub.parameters()

    def achieved(self) -> float:
        return self.rate
