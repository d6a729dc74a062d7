"""What every compression stage works on, and the protocol it implements.

A stage compresses one *sublayer* (the embeddings, one block's attention, or one block's
feed-forward) in increments: the strategy asks for each rate of its schedule in turn
(`compress_to`), re-optimizes `trainable()` on the objective, evaluates, and keeps the best state.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from smartprune.adapters import Adapter
from smartprune.methods.config import FitConfig, StrategyConfig
from smartprune.modules.masked import Maskable, MaskedEmbedding


class InputStats:
    """Second-moment statistics of a sublayer's input, collected batch by batch (SparseGPT's
    ``add_batch``): ``G = sum_t x_t x_t^T`` over calibration tokens, in float64."""

    def __init__(self, d: int) -> None:
        self.gram = torch.zeros(d, d, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        if self.gram.device != flat.device:  # statistics live where the activations are (a GPU, say)
            self.gram = self.gram.to(flat.device)
        self.gram += flat.T @ flat
        self.tokens += flat.shape[0]

    @property
    def feature_norms(self) -> Tensor:
        """``||X_j||_2`` of each input feature over the calibration tokens."""
        return self.gram.diagonal().clamp_min(0).sqrt()


@dataclass
class Plan:
    """What a compression run decides before its per-block work, read by its stages (one per run).

    ``allocation``: each matrix's rate by path (``overall``'s allocation or OWL's block sparsities);
    ``structure``: each structured stage's rate (the structure plan; None when no plan was made);
    ``skip_losses``: the dense model's held-out loss with each block skipped, measured by the plan (the
    depth stage's first ranking); ``magnitude_threshold``: global magnitude's threshold and the ties it
    may still remove, set at its first block and spent across blocks."""

    allocation: dict[str, float] = field(default_factory=dict)
    structure: dict[str, float] | None = None
    skip_losses: dict[int, float] | None = None
    magnitude_threshold: list | None = None

    def rate(self, path: str, default: float) -> float:
        """The allocated rate of the matrix at `path`, else the stage's own."""
        return self.allocation.get(path, default)

    def structured_rate(self, stage: str, default: float) -> float:
        """The planned rate of a structured stage, else its own."""
        return (self.structure or {}).get(stage, default)


@dataclass
class Sublayer:
    """One sublayer of the model: its modules by role name (paths into the model), and for the
    local objective its calibration input and the dense output to fit."""

    adapter: Adapter
    scope: str  # "embedding" | "attention" | "ff" | "block"
    block: int | None
    paths: dict[str, str]
    inputs: Tensor | None = None
    target: Tensor | None = None
    stats: InputStats | None = None
    plan: Plan = field(default_factory=Plan)  # what the run decided before the per-block work

    def input_stats(self) -> InputStats:
        """Statistics of the sublayer's calibration input, computed on first use."""
        if self.stats is None:
            self.stats = InputStats(self.inputs.shape[-1])
            for s in range(0, self.inputs.shape[0], 8):
                self.stats.add_batch(self.inputs[s:s + 8])
        return self.stats

    def module(self, role: str) -> nn.Module:
        return self.adapter.model.get_submodule(self.paths[role])

    def modules(self) -> dict[str, nn.Module]:
        return {role: self.module(role) for role in self.paths}

    def replace(self, role: str, module: nn.Module) -> None:
        self.adapter.replace(self.paths[role], module)

    def parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for mod in self.modules().values():
            for p in mod.parameters():
                if id(p) not in seen and p.numel():
                    seen.add(id(p))
                    out.append(p)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """The sublayer's current computation on its (normalized) input."""
        a = self.adapter
        if self.scope == "attention":
            return a.attention(self.block, x)
        if self.scope == "ff":
            return a.feed_forward(self.block, x)
        if self.scope == "block":
            return a.run_block(self.block, x)
        return a.embed(x)

    def snapshot(self) -> dict[str, nn.Module]:
        return {role: copy.deepcopy(mod) for role, mod in self.modules().items()}

    def restore(self, snap: dict[str, nn.Module]) -> None:
        for role, saved in snap.items():
            current = self.module(role)
            if isinstance(current, MaskedEmbedding):
                # In place: the weight may be shared with a tied output head.
                with torch.no_grad():
                    current.weight.copy_(saved.weight)
                current.mask = None if saved.mask is None else saved.mask.clone()
            else:
                self.replace(role, copy.deepcopy(saved))


class Stage(ABC):
    """One method applied to one sublayer, in rate increments."""

    # Attributes that, with the sublayer's modules, make up the stage's state: a rejected increment
    # restores them too (a subclass that keeps more state across increments lists it here).
    state_attributes: tuple[str, ...] = ("rate",)

    def __init__(self, cfg: FitConfig, sub: Sublayer, generator: torch.Generator) -> None:
        self.cfg = cfg
        self.sub = sub
        self.generator = generator

    @abstractmethod
    def schedule(self, strategy: StrategyConfig) -> list[float]:
        """The rates this stage passes through, in order; the last is its target."""

    @abstractmethod
    def compress_to(self, rate: float) -> None:
        """Apply the structural change for `rate` (monotone: never undoes an earlier increment)."""

    @abstractmethod
    def trainable(self) -> list[nn.Parameter]:
        """Parameters the fit re-optimizes after each increment."""

    def masked(self) -> list[Maskable]:
        """Modules whose masks the fit must respect."""
        return [m for m in self.sub.modules().values() if isinstance(m, Maskable) and m.mask is not None]

    @abstractmethod
    def achieved(self) -> float:
        """The rate actually reached (for the report)."""

    def snapshot(self) -> dict:
        """The sublayer's modules and this stage's own state, to return to if an increment is rejected."""
        return {"modules": self.sub.snapshot(),
                "state": {a: copy.deepcopy(getattr(self, a)) for a in self.state_attributes}}

    def restore(self, snap: dict) -> None:
        self.sub.restore(snap["modules"])
        for a, value in snap["state"].items():
            setattr(self, a, copy.deepcopy(value))

    def finalize(self) -> None:
        """Called once the schedule is done (e.g. to cut removed structure out of the matrices)."""
        return None


class ModelStage(ABC):
    """A method that changes the model as a whole (scope ``model``, e.g. removing blocks): it runs
    once, before the per-sublayer stages, measured on the held-out calibration windows."""

    def __init__(self, cfg, adapter: Adapter, held_out: Tensor, plan: Plan, progress: bool = True) -> None:
        self.cfg, self.adapter, self.held_out, self.plan, self.progress = cfg, adapter, held_out, plan, progress

    @abstractmethod
    def run(self) -> dict:
        """Change the model; returns what the report keeps of it."""


def recursive_rates(target: float, strategy: StrategyConfig) -> list[float]:
    """``step, 2*step, ..., target`` under the recursive strategy, else ``[target]``."""
    if target <= 0:
        return []
    if not strategy.recursive:
        return [target]
    n = max(1, round(target / strategy.step))
    rates = [min(target, strategy.step * k) for k in range(1, n + 1)]
    if rates[-1] < target:
        rates.append(target)
    return rates
