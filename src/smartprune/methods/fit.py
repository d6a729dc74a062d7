"""Re-optimizing compressed weights: Adam with frozen masks and the paper's cumulative loss.

Readings of the paper's ``CumLossFunc(theta, batch, L_prev)``, which it leaves open (all three run):

- ``window``: the loss is ``L(B_t) + sum_{j=1..k} L(B_{t-j})``, every term at the current weights, so
  the previous batches really shape the gradient.
- ``value``: the previous loss is added as a constant, which changes no gradient; the running sum
  ``C_t = L_t + L_{t-1}`` decides which weights the fit keeps (the lowest ``C_t`` seen).
- ``off``: plain Adam on ``L(B_t)``, last weights kept.

Frozen entries stay exactly zero: their gradients are masked before every step and their Adam
moments are zeroed whenever a mask grows, so Adam's update for them is ``0 / (0 + eps) = 0``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartprune.methods.config import FitConfig
from smartprune.modules.masked import Maskable

# An objective maps a batch of calibration-sequence indices to a scalar loss.
Objective = Callable[[Tensor], Tensor]


def local_objective(forward: Callable[[Tensor], Tensor], inputs: Tensor, target: Tensor) -> Objective:
    """Mean squared error between the compressed sublayer's output and the dense one's."""
    return lambda idx: F.mse_loss(forward(inputs[idx]).float(), target[idx].float())


def lm_objective(model: nn.Module, ids: Tensor) -> Objective:
    """The model's own next-token loss on calibration windows (end to end)."""
    return lambda idx: model(ids[idx], labels=ids[idx]).loss


@dataclass
class FitLog:
    losses: list[float] = field(default_factory=list)
    kept_step: int | None = None


class Fitter:
    """Runs fits for one stage; keeps the Adam state across increments while the parameter set is
    unchanged (FPP's iterations), and starts afresh when it changes (a new folded module)."""

    def __init__(self, model: nn.Module, cfg: FitConfig, n_samples: int, generator: torch.Generator) -> None:
        self.model = model
        self.cfg = cfg
        self.n = n_samples
        self.generator = generator
        self.optimizer: torch.optim.Adam | None = None
        self._order: list[int] = []

    def _batches(self) -> Iterator[Tensor]:
        while True:
            if len(self._order) < self.cfg.batch_size:
                self._order += torch.randperm(self.n, generator=self.generator).tolist()
            batch, self._order = self._order[:self.cfg.batch_size], self._order[self.cfg.batch_size:]
            yield torch.tensor(batch)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Adam:
        same = self.optimizer is not None and [id(p) for p in self.optimizer.param_groups[0]["params"]] == \
            [id(p) for p in params]
        if not same:
            self.optimizer = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        return self.optimizer

    def fit(self, params: list[nn.Parameter], masked: list[Maskable], objective: Objective) -> FitLog:
        log = FitLog()
        params = [p for p in params if p.numel()]
        if self.cfg.steps == 0 or not params:
            return log
        opt = self._optimizer(params)
        zero_frozen_state(opt, masked)
        batches = self._batches()
        history: deque[Tensor] = deque(maxlen=self.cfg.window)
        best_value, best_state, prev = float("inf"), None, None
        with only_trainable(self.model, params):
            for step in range(self.cfg.steps):
                idx = next(batches)
                loss = objective(idx)
                total = loss
                if self.cfg.cumulative == "window":
                    for old in history:
                        total = total + objective(old)
                history.append(idx)
                value = loss.item()
                if self.cfg.cumulative == "value":
                    running = value + (prev if prev is not None else value)
                    if running < best_value:  # the weights that produced this loss, before the step
                        best_value, best_state, log.kept_step = running, [p.detach().clone() for p in params], step
                    prev = value
                opt.zero_grad(set_to_none=True)
                total.backward()
                for m in masked:
                    if m.weight.grad is not None:
                        m.weight.grad.mul_(m.mask)
                opt.step()
                log.losses.append(total.item())
        if best_state is not None:
            with torch.no_grad():
                for p, saved in zip(params, best_state, strict=True):
                    p.copy_(saved)
        return log


def zero_frozen_state(opt: torch.optim.Optimizer, masked: list[Maskable]) -> None:
    """Zero Adam's moments at frozen entries (a mask may have grown since the last fit)."""
    for m in masked:
        state = opt.state.get(m.weight)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].mul_(m.mask)


@contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]):
    """Within the block, gradients flow to `params` only; every flag is restored afterwards."""
    ids = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in ids)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def relative_error(forward: Callable[[Tensor], Tensor], inputs: Tensor, target: Tensor, chunk: int = 8) -> float:
    """``||f(x) - y||^2 / ||y||^2`` over all calibration sequences."""
    num = den = 0.0
    for s in range(0, inputs.shape[0], chunk):
        y = target[s:s + chunk]
        num += (forward(inputs[s:s + chunk]) - y).double().pow(2).sum().item()
        den += y.double().pow(2).sum().item()
    return num / max(den, 1e-30)
