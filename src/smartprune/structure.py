"""Install the structured inference modules (`smartprune.inference`) in a compressed model.

Kept apart from `inference.py` so the modules there know nothing of model families: the adapter
says where each block's projections are, this module decides what to swap.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from smartprune.adapters import get_adapter
from smartprune.inference import CSR_MIN_SPARSITY, DiagonalProjection, SparseProjection
from smartprune.nn import FoldedProjection, Projection

log = logging.getLogger(__name__)


def use_structure(model: nn.Module, *, csr_min_sparsity: float = CSR_MIN_SPARSITY) -> dict[str, int]:
    """Swap in the structured modules wherever they apply; returns how many of each were installed."""
    adapter = get_adapter(model)
    counts: Counter[str] = Counter()
    for i in range(len(adapter.blocks())):
        paths = adapter.attention_paths(i)
        v = model.get_submodule(paths["v"])
        if isinstance(v, Projection) and not isinstance(v, FoldedProjection):
            diag = DiagonalProjection.of(v)
            if diag is not None:
                adapter.replace(paths["v"], diag)
                counts["diagonal_v"] += 1
        attn = adapter.structured_attention(i)
        if attn is not None:
            adapter.replace(adapter.attention_module_path(i), attn)
            counts["irc_attention"] += 1
        for path in adapter.ff_paths(i).values():
            p = model.get_submodule(path)
            if type(p) is Projection and p.mask is not None and 1 - p.alive() / p.weight.numel() >= csr_min_sparsity:
                adapter.replace(path, SparseProjection(p))
                counts["csr_ff"] += 1
    log.info("structured inference: %s", dict(counts) or "nothing applies")
    return dict(counts)
