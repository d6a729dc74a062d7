"""Depth: whole blocks removed, chosen by the measured held-out loss of skipping each one.

A block's importance is how much the model's next-token loss on the held-out calibration windows
grows when the model runs without it (the block's residual update skipped, everything else intact).
With ``iterative: true`` (default) blocks go one at a time and the rest are measured again after each
removal, since removing one block changes what the others are worth (the greedy, re-measured
counterpart of the paper's increment-then-re-evaluate schedule); ``false`` ranks them once. The
result is a standard model with fewer layers (``num_hidden_layers``); recovery then retrains it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from smartprune.methods.base import ModelStage
from smartprune.methods.config import option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthConfig:
    """Remove whole blocks (the model keeps fewer layers)."""

    rate_field: ClassVar[str] = "rate"  # the field a sweep varies
    objective: ClassVar[str] = "local"  # nothing is fitted; the held-out loss decides

    rate: float = option(0.25, "fraction of the blocks removed (rounded to whole blocks)", lo=0.0, hi=0.95)
    iterative: bool = option(True, "remove one block at a time, measuring the rest again after each removal")


def held_out_loss(model: nn.Module, ids: Tensor, chunk: int = 8) -> float:
    """Mean next-token cross-entropy of `model` on windows `ids` (batch, seqlen), in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.shape[0], chunk):
            x = ids[s:s + chunk]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += x[:, 1:].numel()
    return total / count


def removed_blocks(rate: float, n: int) -> int:
    """Blocks that `rate` removes of `n` (at least one stays)."""
    return min(n - 1, round(rate * n))


def skip_losses(adapter, ids: Tensor, gone: set[int], candidates: list[int]) -> dict[int, float]:
    """Held-out loss of the model without `gone` and each candidate in turn."""
    out = {}
    for i in candidates:
        with adapter.without_blocks(gone | {i}):
            out[i] = held_out_loss(adapter.model, ids)
    return out


class DepthStage(ModelStage):
    cfg: DepthConfig

    def run(self) -> dict:
        n = len(self.adapter.blocks())
        rate = self.plan.structured_rate("depth", self.cfg.rate)
        want = removed_blocks(rate, n)
        gone: set[int] = set()
        base = held_out_loss(self.adapter.model, self.held_out)
        losses: list[float] = []
        bar = tqdm(total=want, desc="depth", leave=False, disable=not self.progress)
        ranked = None
        while len(gone) < want:
            if self.cfg.iterative or ranked is None:
                known = None if gone else self.plan.skip_losses  # measured by the allocation already
                scores = known or skip_losses(self.adapter, self.held_out, gone, [i for i in range(n) if i not in gone])
                ranked = sorted(scores, key=scores.get)
            pick = next(i for i in ranked if i not in gone)
            gone.add(pick)
            losses.append(scores[pick] if self.cfg.iterative else None)
            bar.update(1)
        bar.close()
        keep = [i for i in range(n) if i not in gone]
        self.adapter.keep_blocks(keep)
        after = held_out_loss(self.adapter.model, self.held_out)
        log.info("depth: removed blocks %s of %d (held-out loss %.3f -> %.3f)", sorted(gone), n, base, after)
        return {"removed": sorted(gone), "kept": len(keep), "loss_before": base, "loss_after": after,
                "loss_at_each_removal": losses}
