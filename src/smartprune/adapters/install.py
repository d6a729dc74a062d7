"""Install the structured inference modules (`smartprune.modules.structured`) in a compressed model.

Kept apart from `inference.py` so the modules there know nothing of model families: the adapter
says where each block's projections are, this module decides what to swap.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from smartprune.adapters import get_adapter
from smartprune.modules.masked import FOLDED, Projection
from smartprune.modules.structured import CSR_MIN_SPARSITY, DiagonalProjection, SparseProjection

log = logging.getLogger(__name__)


def use_structure(model: nn.Module, *, csr_min_sparsity: float = CSR_MIN_SPARSITY) -> dict[str, int]:
    """Swap in the structured modules wherever they apply; returns how many of each were installed."""
    adapter = get_adapter(model)
    counts: Counter[str] = Counter()
    for i in range(len(adapter.blocks())):
        groups = adapter.accounting_groups(i)
        for path in groups.get("dwc", []):
            v = model.get_submodule(path)
            if isinstance(v, Projection) and not isinstance(v, FOLDED):
                diag = DiagonalProjection.of(v)
                if diag is not None:
                    adapter.replace(path, diag)
                    counts["diagonal_v"] += 1
        attn = adapter.structured_attention(i)
        if attn is not None:
            adapter.replace(*attn)
            counts["irc_attention"] += 1
        for path in [*groups.get("fpp_ff", []), *groups.get("linear", [])]:
            p = model.get_submodule(path)
            if type(p) is Projection and p.mask is not None and 1 - p.alive() / p.weight.numel() >= csr_min_sparsity:
                adapter.replace(path, SparseProjection(p))
                counts["csr_ff"] += 1
    log.info("structured inference: %s", dict(counts) or "nothing applies")
    return dict(counts)


def coverage(model: nn.Module) -> dict[str, list[str]]:
    """Per block, what structured inference runs (IRC attention, diagonal V, CSR feed-forward) and,
    for attention kept on the reference path, why."""
    adapter = get_adapter(model)
    out: dict[str, list[str]] = {}
    for i in range(len(adapter.blocks())):
        reason = adapter.structured_reason(i)
        items = ["IRC attention" if reason is None else f"attention: reference path ({reason})"]
        for path in adapter.accounting_groups(i).get("dwc", []):
            v = model.get_submodule(path)
            diag = isinstance(v, Projection) and not isinstance(v, FOLDED) and DiagonalProjection.of(v) is not None
            items.append("diagonal V" if diag else "V: dense path (not one entry per output)")
        out[str(i)] = items
    return out
