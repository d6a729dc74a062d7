"""The learning-rate schedule of every training loop: linear warm-up, then cosine decay to a tenth.

Written out rather than torch's ``LambdaLR`` so the value is computed exactly as ``peak * ...`` each
step (a resumed run needs nothing but the step number, and earlier runs' numbers stay bit for bit).
"""

from __future__ import annotations

import math

from smartprune.recipes.schema import RecoverConfig


def warmup_cosine(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to a tenth of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def lr_at(step: int, total: int, cfg: RecoverConfig) -> float:
    """Recovery's end-to-end schedule: the warm-up is a share of the steps (at least one step when it is not
    0); the peak is `lr_after_fits` where block-wise fits came first and it is set, else `lr`."""
    fitted = cfg.objective == "blockwise" and cfg.lr_after_fits is not None
    peak = cfg.lr_after_fits if fitted else cfg.lr
    return warmup_cosine(step, total, peak, max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0)
