"""Magnitude pruning: remove the weights of smallest |W|, per matrix or over all block linears."""

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
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: the smallest |W| per matrix, or over all block linears at once (global)."""

    scope: str = option("matrix", "compare weights within each matrix or across all block linears",
                        choices=("matrix", "global"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope == "global" and self.nm is not None:
            raise ValueError("scope: 'global' cannot be combined with an N:M pattern")
        if self.scope == "global" and self.owl is not None:
            raise ValueError("scope: 'global' ranks all block linears together; OWL sets one sparsity per block")

def global_threshold(weights: list[Tensor], sparsity: float) -> tuple[float, int]:
    """The |W| value at which ``round(sparsity * total)`` entries of all `weights` are removed, and
    how many entries exactly equal to it must go as well (ties are rare but counted)."""
    values = torch.cat([w.detach().abs().flatten() for w in weights])
    k = round(sparsity * values.numel())
    if k == 0:
        return -1.0, 0
    t = torch.kthvalue(values, k).values.item()
    return t, k - int((values < t).sum())


class MagnitudeStage(OneShotStage):
    cfg: MagnitudeConfig
    needs_stats = False

    def prune(self, role: str, proj: Projection, stats: InputStats | None) -> Tensor:
        score = proj.weight.detach().abs().T
        if self.cfg.nm is not None:
            return lowest_n_of_m(score, *self.cfg.nm)
        if self.cfg.scope == "matrix":
            return lowest_in_matrix(score, round(self.sparsity_of(role) * score.numel()))
        plan = self.sub.plan
        if plan.magnitude_threshold is None:  # weights are not updated, so the dense values serve
            a = self.sub.adapter
            weights = [a.model.get_submodule(p).weight for i in range(len(a.blocks()))
                       for p in a.linear_paths(i).values()]
            plan.magnitude_threshold = list(global_threshold(weights, self.cfg.sparsity))
        t, ties_left = plan.magnitude_threshold
        prune = score < t
        ties = (score == t).flatten().nonzero().flatten()[:ties_left]
        prune.view(-1)[ties] = True
        plan.magnitude_threshold[1] = ties_left - ties.numel()
        return prune
