"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, comparing weights within each output."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from smartprune.methods.base import InputStats
from smartprune.methods.criteria import wanda_score
from smartprune.methods.oneshot import OneShotStage, PruneConfig
from smartprune.methods.pruning import lowest_n_of_m, lowest_per_row
from smartprune.modules.masked import Projection


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output."""

class WandaStage(OneShotStage):
    cfg: WandaConfig

    def prune(self, role: str, proj: Projection, stats: InputStats | None) -> Tensor:
        score = wanda_score(proj.weight.T, stats.feature_norms, inputs=1)
        if self.cfg.nm is not None:
            return lowest_n_of_m(score, *self.cfg.nm)
        return lowest_per_row(score, self.sparsity_of(role))
