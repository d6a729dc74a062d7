"""Calibration windows: reproducible, and the held-out ones disjoint from those the fit runs on."""

import pytest
import torch

from smartprune.data import split_windows
from smartprune.errors import DataError


def _positions(windows: torch.Tensor) -> set[int]:
    return set(windows.flatten().tolist())


@pytest.mark.parametrize("seed", range(5))
def test_held_out_windows_never_overlap_calibration_windows(seed):
    # A stream of its own positions, short enough that random starts would collide often
    # (24 windows of 16 over 600 tokens cover most of the text).
    stream = torch.arange(600)
    ids, held = split_windows(stream, samples=20, eval_samples=4, seqlen=16, seed=seed)
    assert ids.shape == (20, 16) and held.shape == (4, 16)
    assert not _positions(ids) & _positions(held)
    assert len(_positions(held)) == 4 * 16  # held-out windows are disjoint from each other too
    again = split_windows(stream, samples=20, eval_samples=4, seqlen=16, seed=seed)
    assert torch.equal(again[0], ids) and torch.equal(again[1], held)


def test_calibration_windows_are_the_first_draw_of_the_seed():
    # The compression windows are what they were before the held-out fix: the seed's first draw.
    stream = torch.arange(5000)
    gen = torch.Generator().manual_seed(3)
    starts = torch.randperm(5000 - 32, generator=gen)[:8]
    ids, _ = split_windows(stream, samples=8, eval_samples=2, seqlen=32, seed=3)
    assert torch.equal(ids[:, 0], starts)


def test_too_short_for_disjoint_held_out_windows_is_a_data_error():
    with pytest.raises(DataError, match="held-out windows"):
        split_windows(torch.arange(100), samples=5, eval_samples=4, seqlen=16, seed=0)
