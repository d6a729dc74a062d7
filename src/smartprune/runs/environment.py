"""The machine and library versions a run was measured with (every run's JSON carries it)."""

from __future__ import annotations

import platform

import torch


def environment() -> dict:
    """What the numbers were measured on."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor()}


