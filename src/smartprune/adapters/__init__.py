"""Adapters per model family: a table entry (`adapters.table`) per ``config.model_type`` for the
paper's methods, the generic adapter for any other causal LM (baselines only)."""

from __future__ import annotations

from torch import nn

from smartprune.adapters.base import Adapter
from smartprune.adapters.generic import GenericAdapter
from smartprune.adapters.layout import AttentionProjections, Layout, LayoutAdapter
from smartprune.adapters.table import LAYOUTS


def supported_model_types() -> list[str]:
    """Model types with a table entry (the paper's methods); every causal LM gets the baselines."""
    return sorted(LAYOUTS)


def paper_methods_unsupported(config) -> str | None:
    """Why the paper's methods cannot run on a model with `config` (one line), or None."""
    layout = LAYOUTS.get(config.model_type)
    if layout is None:
        return (f"model type '{config.model_type}' has no entry in smartprune's adapter table, which the paper's "
                f"methods need (they act on named Q/K/V/O and feed-forward roles); entries: "
                f"{', '.join(supported_model_types())}")
    reason = layout.unsupported(config)
    return None if reason is None else f"{config.model_type} with {reason}"


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`, with its layers converted to smartprune modules."""
    why = paper_methods_unsupported(model.config)
    adapter = GenericAdapter(model, why) if why else LayoutAdapter(model, LAYOUTS[model.config.model_type])
    adapter.prepare()
    return adapter


__all__ = [
    "LAYOUTS",
    "Adapter",
    "AttentionProjections",
    "GenericAdapter",
    "Layout",
    "LayoutAdapter",
    "get_adapter",
    "paper_methods_unsupported",
    "supported_model_types",
]
