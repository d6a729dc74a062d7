"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2024), the published non-uniform baseline.

Each block's outlier ratio is the share of its block linears' Wanda scores ``|W_ij| * ||X_i||`` (input
norms from the dense model on the calibration windows) above ``m`` times the block's mean score. The
ratios are scaled into ``[0, 2 * lambda]``, shifted so their mean is the kept share ``1 - sparsity``,
and each block keeps that share: blocks with more outliers are pruned less, the block sparsities span
exactly ``2 * lambda`` (as the OWL code normalises; the paper's "within lambda of the target" holds when
the ratios are spread evenly), and their mean over the blocks (of equal size in a transformer) is exactly
the target. The rates go to the pruning stage through ``Plan.allocation``, as
the measured allocation's do (`smartprune.compression.allocation`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from smartprune.adapters import Adapter
from smartprune.compression.allocation import input_norms

log = logging.getLogger(__name__)


def outlier_ratio(scores: list[Tensor], m: float) -> float:
    """The share of all `scores` (one block's matrices) above `m` times their mean."""
    flat = torch.cat([s.flatten().double() for s in scores])
    return (flat > m * flat.mean()).double().mean().item()


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios (OWL's normalisation, mean kept exact)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    kept = (d - d.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(d)
    kept = kept - kept.mean() + (1 - sparsity)
    return [min(max(1 - k, 0.0), 1.0) for k in kept.tolist()]


def owl_rates(adapter: Adapter, calib_ids: Tensor, sparsity: float, m: float, lam: float
              ) -> tuple[dict[str, float], dict]:
    """The rate of every block linear under OWL, and the report (ratios, sparsities)."""
    model = adapter.model
    paths = [list(adapter.linear_paths(i).values()) for i in range(len(adapter.blocks()))]
    norms = input_norms(model, calib_ids, [p for block in paths for p in block])  # the dense model, one pass
    ratios = []
    for block in paths:
        scores = [model.get_submodule(p).weight.detach().abs().double() * norms[p][:, None] for p in block]
        ratios.append(outlier_ratio(scores, m))
    sparsities = owl_sparsities(ratios, sparsity, lam)
    rates = {p: s for block, s in zip(paths, sparsities, strict=True) for p in block}
    log.info("OWL: outlier ratios %.4f-%.4f, block sparsities %.3f-%.3f (target %.3f)", min(ratios), max(ratios),
             min(sparsities), max(sparsities), sparsity)
    return rates, {"m": m, "lambda": lam, "target": sparsity, "outlier_ratios": ratios, "sparsities": sparsities}
