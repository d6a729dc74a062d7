"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, comparing weights within each output."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from smartprune.methods.base import InputStats
from smartprune.methods.oneshot import OneShotStage, PruneConfig
from smartprune.methods.pruning import lowest_n_of_m, lowest_per_row
from smartprune.modules.masked import Projection


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output."""

def wanda_score(weight_t: Tensor, feature_norms: Tensor) -> Tensor:
    """|W| times the input feature norm, in (d_out, d_in) layout."""
    return weight_t.abs() * feature_norms.to(weight_t.dtype)[None, :]


class WandaStage(OneShotStage):
    cfg: WandaConfig

    def prune(self, role: str, proj: Projection, stats: InputStats | None) -> Tensor:
        score = wanda_score(proj.weight.detach().T, stats.feature_norms)
        if self.cfg.nm is not None:
            return lowest_n_of_m(score, *self.cfg.nm)
        return lowest_per_row(score, self.sparsity_of(role))
