"""Attention heads: whole heads removed, aware of grouped-query attention, Q/K/V/O cut to match.

Grouped-query attention shares one key/value head among ``g = heads / kv_heads`` query heads. Two
units keep the result a standard attention (one head count and one head size for every block):

- ``query``: the same number of query heads removed from every group; K and V stay, each group keeps
  ``g - r`` query heads (``num_attention_heads`` shrinks, ``num_key_value_heads`` stays);
- ``group``: whole groups, their K/V head and all their query heads (both counts shrink).

Importance, measured on the calibration tokens: ``activation`` (default) is ``sum_t ||o_h(t) W_O[h]||^2``,
the squared contribution of head ``h`` to the attention's output (``o_h`` its slice of the output
projection's input); ``magnitude`` is the norm of the head's Q columns and O rows. A group scores the
sum of its query heads. Increments mask the removed heads' rows of W_O (which removes their
contribution exactly) and their Q (and for groups K/V) columns; under the recursive strategy the
survivors are re-fitted and re-scored after each increment; at the end the matrices are cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from smartprune.errors import RecipeError
from smartprune.methods.base import Stage, Sublayer, recursive_rates
from smartprune.methods.compensate import Compensation
from smartprune.methods.config import FitConfig, StrategyConfig, option
from smartprune.methods.criteria import offered
from smartprune.modules.masked import Projection, forward_pre_hooks, run_in_chunks

ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class HeadsConfig(FitConfig):
    """Remove whole attention heads (every block keeps the same head counts)."""

    rate_field: ClassVar[str] = "rate"  # the field a sweep varies

    steps: int = option(0, "Adam steps after each increment (0 = one shot, no re-fit)", lo=0, hi=100_000)
    rate: float = option(0.34, "fraction of the query heads (unit query) or key/value groups (unit group) removed",
                         lo=0.0, hi=0.99)
    unit: str = option("query", "query (the same number of query heads in every key/value group) | group (whole "
                       "key/value groups with their query heads)", choices=("query", "group"))
    criterion: str = option("activation", "activation (squared output contribution on the calibration tokens) | "
                            "magnitude (weight norm)", choices=offered("units"))
    compensate: bool = option(True, "re-fit the output projection's kept columns of heads in least squares on the "
                              "calibration tokens for the heads removed (methods/compensate.py)")


def removed_count(rate: float, heads: int, kv: int, unit: str) -> int:
    """Query heads per group (unit query) or groups (unit group) that `rate` removes; one always stays."""
    n = heads // kv if unit == "query" else kv
    return min(n - 1, round(rate * n))


def head_importance(sub: Sublayer, heads: int, head_dim: int, criterion: str) -> Tensor:
    """One score per query head (higher: keep), on the sublayer as it is now."""
    q, o = sub.module("q").weight.detach().double(), sub.module("o").weight.detach().double()
    if criterion == "magnitude":
        return (q.pow(2).reshape(-1, heads, head_dim).sum((0, 2)) + o.pow(2).reshape(heads, head_dim, -1).sum((1, 2)))
    w = o.reshape(heads, head_dim, -1)
    energy = torch.zeros(heads, dtype=torch.float64, device=o.device)

    def hook(_module, args) -> None:
        x = args[0].detach().double().reshape(-1, heads, head_dim)
        energy.add_(torch.einsum("thd,hde->the", x, w).pow(2).sum((0, 2)))

    with forward_pre_hooks([(sub.module("o"), hook)]):
        run_in_chunks(sub.forward, sub.inputs)
    return energy


class HeadsStage(Stage):
    cfg: HeadsConfig
    state_attributes = ("rate", "alive")

    def __init__(self, cfg: HeadsConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        if set(sub.paths) != set(ROLES) or sub.adapter.fused_attention():
            raise RecipeError("attn_heads needs separate q, k, v and o projections (fused QKV families such as "
                              "GPT-2, Phi-3 and GPT-NeoX are not supported)")
        self.heads, self.kv, self.head_dim = sub.adapter.head_counts(sub.block)
        self.group = self.heads // self.kv
        self.rate = 0.0
        self.alive = torch.ones(self.heads, dtype=torch.bool)  # query heads, group by group
        self.compensation = Compensation(sub, "o", refit=cfg.steps > 0) if cfg.compensate else None

    def final_rate(self) -> float:
        return self.sub.plan.structured_rate("attn_heads", self.cfg.rate)

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        return recursive_rates(self.final_rate(), strategy)

    def compress_to(self, rate: float) -> None:
        want = removed_count(rate, self.heads, self.kv, self.cfg.unit)
        before = self.alive.clone()
        scores = head_importance(self.sub, self.heads, self.head_dim, self.cfg.criterion).cpu()
        scores[~self.alive] = float("inf")
        if self.cfg.unit == "query":  # per group, its lowest-scoring live heads until `want` are gone
            per_group = scores.reshape(self.kv, self.group)
            for g in range(self.kv):
                gone = int((~self.alive[g * self.group:(g + 1) * self.group]).sum())
                for h in per_group[g].argsort()[:max(0, want - gone)]:
                    self.alive[g * self.group + int(h)] = False
        else:
            group_alive = self.alive.reshape(self.kv, self.group).all(1)
            group_scores = scores.reshape(self.kv, self.group).sum(1)
            for g in group_scores.argsort()[:max(0, want - int((~group_alive).sum()))]:
                self.alive[int(g) * self.group:(int(g) + 1) * self.group] = False
        if self.compensation is not None:
            self.compensation.remove(self._columns(self.alive), self._columns(before & ~self.alive))
        self._mask()
        self.rate = rate

    def _columns(self, alive: Tensor) -> Tensor:
        """Per output column of a projection with one block of `head_dim` columns per head."""
        return alive.repeat_interleave(self.head_dim)

    def _kv_alive(self) -> Tensor:
        return self.alive.reshape(self.kv, self.group).any(1)

    def _mask(self) -> None:
        q, k, v, o = (self.sub.module(r) for r in ROLES)
        cols = self._columns(self.alive)
        q.set_mask(cols[None, :].to(q.weight.device).expand_as(q.weight))
        o.set_mask(cols[:, None].to(o.weight.device).expand_as(o.weight))
        kv_cols = self._columns(self._kv_alive())
        for m in (k, v):
            m.set_mask(kv_cols[None, :].to(m.weight.device).expand_as(m.weight))

    def finalize(self) -> None:
        if bool(self.alive.all()):
            return
        q, k, v, o = (self.sub.module(r) for r in ROLES)
        cols = self._columns(self.alive).nonzero().flatten()
        kv_cols = self._columns(self._kv_alive()).nonzero().flatten()

        def cut(p: Projection, keep: Tensor) -> Projection:
            return Projection(p.weight.detach()[:, keep], None if p.bias is None else p.bias.detach()[keep])

        self.sub.replace("q", cut(q, cols))
        self.sub.replace("k", cut(k, kv_cols))
        self.sub.replace("v", cut(v, kv_cols))
        self.sub.replace("o", Projection(o.weight.detach()[cols], o.bias))
        kv = int(self._kv_alive().sum())
        self.sub.adapter.set_head_counts(self.sub.block, int(self.alive.sum()), kv)

    def trainable(self) -> list[nn.Parameter]:
        return self.sub.parameters()

    def achieved(self) -> float:
        return self.rate
