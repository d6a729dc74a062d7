"""The validated dataclass field every configuration uses (methods, recipe sections): its default, its
doc, and its choices or range, read by the recipe schema's validation and by the CLI's generated flags.
Free of torch, so the command line can draw flags from it without loading a model library."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, doc: str, *, choices: tuple[str, ...] | None = None,
           lo: float | None = None, hi: float | None = None, alias: str | None = None) -> Any:
    """A dataclass field with validation metadata (choices or closed range [lo, hi]; `alias`: the key a
    recipe may use instead of the field's name, e.g. a Python keyword such as ``lambda``)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "lo": lo, "hi": hi, "alias": alias})
