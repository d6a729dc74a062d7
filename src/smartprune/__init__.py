"""smartprune: the smart-pruning compression methods of Belhaouari & Kraidia (2025) for causal
language models, with honest measurements beside peer methods.

The public API is imported lazily (PEP 562), so ``import smartprune`` loads neither torch nor
transformers until a function is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "smartprune.storage.load",
    "save": "smartprune.storage.save",
    "write_dense": "smartprune.storage.save",
    "compress": "smartprune.compression.engine",
    "CompressionResult": "smartprune.compression.engine",
    "load_model": "smartprune.storage.sources",
    "load_recipe": "smartprune.recipes",
    "builtin_recipes": "smartprune.recipes",
    "Recipe": "smartprune.recipes",
    "perplexity": "smartprune.evaluation",
    "compress_model": "smartprune.runs.compress",
    "run_demo": "smartprune.runs.demo",
    "SmartpruneError": "smartprune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'smartprune' has no attribute '{name}'")
