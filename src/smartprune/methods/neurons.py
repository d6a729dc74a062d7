"""Feed-forward width: whole intermediate neurons removed, the matrices cut to a smaller dense width.

A neuron ``j`` is a column of every input projection (gate / up, GPT-2's ``c_fc``) and a row of the
output projection (down). Its importance is measured, not guessed from weights alone:

- ``activation`` (default): ``sum_t h_j(t)^2 * ||W_down[j, :]||^2``, the squared contribution the
  neuron adds to the sublayer's output over the calibration tokens (``h`` the input of the output
  projection). It is exactly the output error of removing that one neuron when its contribution is
  orthogonal to the others', the structured twin of Wanda's ``|W| * ||X||`` (Minitron scores width
  by activations the same way);
- ``magnitude``: the L2 norm of the neuron's weights (no data; today's FPP ``structure: neuron``).

Under the recursive strategy the rate grows step by step and after each increment the surviving
weights are re-fitted and the neurons re-scored on the sublayer as it now is: the paper's iterative
freeze-and-fit schedule applied to neurons (its sign balance has no meaning for scores that are
never negative). Every block loses ``round(rate * width)`` neurons, so all blocks keep one width,
which a standard config (``intermediate_size``) expresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from smartprune.methods.base import Stage, Sublayer, recursive_rates
from smartprune.methods.compensate import Compensation
from smartprune.methods.config import FitConfig, StrategyConfig, option
from smartprune.methods.criteria import offered
from smartprune.modules.masked import Projection, forward_pre_hooks, run_in_chunks


@dataclass(frozen=True)
class NeuronsConfig(FitConfig):
    """Remove whole feed-forward neurons (every block to the same smaller width)."""

    rate_field: ClassVar[str] = "rate"  # the field a sweep varies

    steps: int = option(0, "Adam steps after each increment (0 = one shot, no re-fit)", lo=0, hi=100_000)
    rate: float = option(0.3, "fraction of each block's feed-forward neurons removed", lo=0.0, hi=0.99)
    criterion: str = option("activation", "activation (squared output contribution on the calibration tokens) | "
                            "magnitude (weight norm)", choices=offered("units"))
    compensate: bool = option(True, "re-fit the output projection's kept rows in least squares on the calibration "
                              "tokens for the neurons removed (methods/compensate.py)")


def cut_neurons(inputs: list[Projection], output: Projection, alive: Tensor) -> tuple[list[Projection], Projection]:
    """Smaller dense projections without the dead neurons (exact: a dead neuron's outgoing row is zero)."""
    keep = alive.nonzero().flatten()
    new_in = [Projection(p.weight.detach()[:, keep], None if p.bias is None else p.bias.detach()[keep])
              for p in inputs]
    return new_in, Projection(output.weight.detach()[keep], output.bias)


def cut_dead_neurons(sub: Sublayer, alive: Tensor) -> None:
    """Replace the sublayer's projections by smaller dense ones without the neurons `alive` marks dead."""
    roles = list(sub.paths)
    *inputs, output = (sub.module(r) for r in roles)
    new_in, new_out = cut_neurons(inputs, output, alive.to(output.weight.device))
    for role, mod in zip(roles, [*new_in, new_out], strict=True):
        sub.replace(role, mod)


def neuron_importance(sub: Sublayer, criterion: str) -> Tensor:
    """One score per intermediate neuron of the sublayer as it is now (higher: keep)."""
    *inputs, output = sub.modules().values()
    w_out = output.weight.detach().double()
    if criterion == "magnitude":
        sq = w_out.pow(2).sum(1)
        for m in inputs:
            sq = sq + m.weight.detach().double().pow(2).sum(0)
        return sq.sqrt()
    energy = torch.zeros(w_out.shape[0], dtype=torch.float64, device=w_out.device)  # sum_t h_j(t)^2

    def hook(_module, args) -> None:
        energy.add_(args[0].detach().double().pow(2).reshape(-1, energy.numel()).sum(0).to(energy.device))

    with forward_pre_hooks([(output, hook)]):
        run_in_chunks(sub.forward, sub.inputs)
    return energy * w_out.pow(2).sum(1)


class NeuronsStage(Stage):
    cfg: NeuronsConfig
    state_attributes = ("rate", "alive")

    def __init__(self, cfg: NeuronsConfig, sub: Sublayer, generator: torch.Generator) -> None:
        super().__init__(cfg, sub, generator)
        self.rate = 0.0
        width = list(sub.modules().values())[-1].weight.shape[0]
        self.alive = torch.ones(width, dtype=torch.bool)
        output = list(sub.paths)[-1]
        self.compensation = Compensation(sub, output, refit=cfg.steps > 0) if cfg.compensate else None

    def final_rate(self) -> float:
        """The configured rate, or the one a structured allocation chose for every block."""
        return self.sub.plan.structured_rate("ff_neurons", self.cfg.rate)

    def schedule(self, strategy: StrategyConfig) -> list[float]:
        return recursive_rates(self.final_rate(), strategy)

    def compress_to(self, rate: float) -> None:
        width = self.alive.numel()
        new = round(rate * width) - int((~self.alive).sum())
        if new > 0:
            scores = neuron_importance(self.sub, self.cfg.criterion).cpu()
            scores[~self.alive] = float("inf")
            before = self.alive.clone()
            self.alive[scores.argsort()[:new]] = False
            if self.compensation is not None:
                self.compensation.remove(self.alive, before & ~self.alive)
            *inputs, output = self.sub.modules().values()
            for m in inputs:
                m.set_mask(self.alive[None, :].to(m.weight.device).expand_as(m.weight))
            output.set_mask(self.alive[:, None].to(output.weight.device).expand_as(output.weight))
        self.rate = rate

    def finalize(self) -> None:
        if bool(self.alive.all()):
            return
        cut_dead_neurons(self.sub, self.alive)

    def trainable(self) -> list[nn.Parameter]:
        return self.sub.parameters()

    def achieved(self) -> float:
        return self.rate
