"""One-shot pruning baselines on every linear layer of a block (SparseGPT's two-phase interface:
collect input statistics with ``add_batch``, then prune).

Within a sublayer the projections are pruned group by group in data-flow order (Q, K, V, then O;
gate and up, then down), each group's statistics collected with the earlier groups already pruned,
as the published "true sequential" variants do.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from smartprune.methods.base import InputStats, Stage, Sublayer
from smartprune.methods.config import FitConfig, NMPattern, StrategyConfig, option
from smartprune.modules.masked import Projection, forward_pre_hooks, run_in_chunks


@dataclass(frozen=True)
class OWLConfig:
    """OWL's layer-wise sparsities (Yin et al. 2024; `smartprune.compression.owl`)."""

    m: float = option(5.0, "a score is an outlier above m times its block's mean Wanda score", lo=0.0, hi=1e6)
    lam: float = option(0.08, "block sparsities span 2 x lambda, their mean the target (key: lambda)", lo=0.0, hi=1.0,
                        alias="lambda")


@dataclass(frozen=True)
class PruneConfig(NMPattern, FitConfig):
    """A one-shot pruning baseline on every linear layer of every block (no re-fitting by default)."""

    rate_field: ClassVar[str] = "sparsity"  # the field a sweep varies

    steps: int = option(0, "Adam steps after pruning (0 = the published one-shot method)", lo=0, hi=100_000)
    sparsity: float = option(0.5, "fraction of each matrix's weights zeroed (N:M patterns: N/M)", lo=0.0, hi=1.0)
    pattern: str = option("unstructured", "unstructured | N:M (N zeros in every M consecutive inputs, e.g. 2:4)")
    owl: OWLConfig | None = option(  # noqa: RUF009 (option() is dataclasses.field with metadata)
        None, "OWL's non-uniform block sparsities around `sparsity`, e.g. {m: 5, lambda: 0.08} ({} for these "
        "defaults); none: every matrix at `sparsity`")

    def __post_init__(self) -> None:
        self._rate_from_pattern()
        if self.owl is not None and self.nm is not None:
            raise ValueError("owl: an N:M pattern fixes every matrix's sparsity; OWL needs unstructured")

def prune_groups(sub: Sublayer) -> list[list[str]]:
    """Projection roles of a sublayer in data-flow groups: inputs first, the output projection last."""
    return sub.adapter.prune_groups(sub.scope, list(sub.paths))


def collect_stats(sub: Sublayer, roles: list[str], chunk: int = 8) -> dict[str, InputStats]:
    """Input statistics of each projection in `roles`, from the sublayer run on its calibration input."""
    stats = {role: InputStats(sub.module(role).d_in) for role in roles}
    hooks = [(sub.module(role), lambda _m, args, s=stats[role]: s.add_batch(args[0])) for role in roles]
    with forward_pre_hooks(hooks):
        run_in_chunks(sub.forward, sub.inputs, chunk)
    return stats


class OneShotStage(Stage):
    """Prune every projection of the sublayer to the configured sparsity in one step."""

    cfg: PruneConfig
    needs_stats = True

    def __init__(self, cfg: PruneConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        self.rate = 0.0

    def sparsity_of(self, role: str) -> float:
        """The configured sparsity, or the matrix's own rate where an allocation gave one."""
        return self.sub.plan.rate(self.sub.paths[role], self.cfg.sparsity)

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        top = max(self.sparsity_of(role) for role in self.sub.paths)
        return [top] if top > 0 else []

    def compress_to(self, rate: float) -> None:
        for roles in prune_groups(self.sub):
            stats = collect_stats(self.sub, roles) if self.needs_stats else {}
            for role in roles:
                proj: Projection = self.sub.module(role)
                prune_t = self.prune(role, proj, stats.get(role))  # (d_out, d_in), True = removed
                proj.set_mask(~prune_t.T)
        self.rate = rate

    @abstractmethod
    def prune(self, role: str, proj: Projection, stats: InputStats | None) -> torch.Tensor:
        """The prune mask of `proj` in (d_out, d_in) layout; may also update ``proj.weight``."""

    def trainable(self) -> list[nn.Parameter]:
        return self.sub.parameters()

    def achieved(self) -> float:
        return self.rate
