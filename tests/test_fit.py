"""The fit loop: masks stay exactly zero through Adam, and the cumulative-loss readings."""

import pytest
import torch
from torch import nn

from smartprune.methods.config import FitConfig
from smartprune.methods.fit import Fitter
from smartprune.modules.masked import Projection


def _masked_projection():
    torch.manual_seed(0)
    proj = Projection(torch.randn(6, 4))
    keep = torch.rand(6, 4) > 0.5
    proj.set_mask(keep)
    return proj, keep


def _objective(proj):
    x = torch.randn(10, 3, 6)
    y = torch.randn(10, 3, 4)
    return lambda idx: ((proj(x[idx]) - y[idx]) ** 2).mean()


def test_masked_entries_stay_exactly_zero_through_adam_steps_and_masks_growing():
    proj, keep = _masked_projection()
    model = nn.ModuleList([proj])
    fitter = Fitter(model, FitConfig(steps=25, lr=0.05, batch_size=4, cumulative="off"), 10, torch.Generator())
    fitter.fit([proj.weight], [proj], _objective(proj))
    assert torch.equal(proj.weight[~keep], torch.zeros(int((~keep).sum())))
    alive_before = proj.weight.detach()[keep].clone()
    assert not torch.equal(alive_before, torch.zeros_like(alive_before))
    # grow the mask: the optimizer (kept across increments) must not revive the newly frozen entries
    more = keep.clone()
    more[keep.nonzero()[0][0], keep.nonzero()[0][1]] = False
    proj.set_mask(more)
    fitter.fit([proj.weight], [proj], _objective(proj))
    assert torch.equal(proj.weight[~more], torch.zeros(int((~more).sum())))
    state = fitter.optimizer.state[proj.weight]
    assert torch.equal(state["exp_avg"][~more], torch.zeros(int((~more).sum())))


def test_window_reading_evaluates_the_previous_batch_at_current_weights():
    proj, _ = _masked_projection()
    calls = []
    base = _objective(proj)

    def counted(idx):
        calls.append(idx.tolist())
        return base(idx)

    Fitter(nn.ModuleList([proj]), FitConfig(steps=5, batch_size=2, cumulative="window", window=1), 10,
           torch.Generator()).fit([proj.weight], [proj], counted)
    assert len(calls) == 1 + 2 * 4  # step 0 has no previous batch
    assert calls[2] == calls[0]  # step 1 re-evaluates step 0's batch


def test_value_reading_keeps_the_weights_with_the_lowest_running_loss():
    p = nn.Parameter(torch.tensor([0.0]))
    # lr far too large: Adam's first step jumps away from the optimum at 0 and the loss only grows
    objective = lambda idx: (p - 0.0).pow(2).sum() + 0.0 * idx.sum()  # noqa: E731
    fitter = Fitter(nn.ParameterList([p]), FitConfig(steps=6, lr=1.0, batch_size=1, cumulative="value"), 4,
                    torch.Generator())
    with torch.no_grad():
        p.fill_(0.01)
    log = fitter.fit([p], [], objective)
    assert log.kept_step == 0 and p.item() == pytest.approx(0.01)  # the first weights had the lowest running loss
    with torch.no_grad():
        p.fill_(0.01)
    off = Fitter(nn.ParameterList([p]), FitConfig(steps=6, lr=1.0, batch_size=1, cumulative="off"), 4,
                 torch.Generator())
    off.fit([p], [], objective)
    assert abs(p.item() - 0.01) > 0.1  # plain Adam keeps its last weights
