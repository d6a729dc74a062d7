"""Adapters per model family, looked up by ``config.model_type``."""

from __future__ import annotations

from torch import nn

from smartprune.adapters.base import Adapter, AttentionProjections
from smartprune.adapters.gpt2 import GPT2Adapter
from smartprune.adapters.llama import LlamaAdapter
from smartprune.errors import ModelError

ADAPTERS: tuple[type[Adapter], ...] = (GPT2Adapter, LlamaAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_class(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise ModelError(f"unsupported architecture '{model_type}': supported model types are "
                     f"{', '.join(supported_model_types())}")


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`, with its layers converted to smartprune modules."""
    adapter = adapter_class(model.config.model_type)(model)
    adapter.prepare()
    return adapter


__all__ = ["ADAPTERS", "Adapter", "AttentionProjections", "adapter_class", "get_adapter", "supported_model_types"]
