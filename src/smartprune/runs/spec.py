"""What a run is: the model, the recipe and its overrides, the recovery, the evaluation, the outputs and the
compute, as one validated specification that `compress`, `demo` and the library build, then hand to
the pre-flight (runs/preflight.py) and the executor (runs/pipeline.py).

A specification is built from keywords (`RunSpec.of`): each keyword belongs to one group, so a caller
passes ``out=...``, ``device=...``, ``calib_samples=...`` flat and an unknown keyword is a TypeError, as
for any Python function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartprune.recipes import Recipe


@dataclass(frozen=True)
class Outputs:
    """Where the result goes; nothing is written before every check of the run has passed."""

    out: Path | None = None  # the compressed folder (our format)
    dense_out: Path | None = None  # also a plain Hugging Face folder
    gguf_out: Path | None = None  # also a GGUF file (a standard result only)
    gguf_type: str = "f16"
    dtype: str = "float32"  # stored value precision in `out`
    json_path: Path | None = None  # the run's results as JSON
    overwrite: bool = False


@dataclass(frozen=True)
class Compute:
    device: str | torch.device = "auto"
    offload: bool | None = None  # one block at a time on the device (None: when the model would not fit)
    compute_dtype: str = "auto"


@dataclass(frozen=True)
class Overrides:
    """Changes to the recipe, validated as the recipe's own fields are."""

    calib_samples: int | None = None
    calib_seqlen: int | None = None
    target_compression: float | None = None
    quick: bool = False  # the demo's --quick: 8 calibration windows of 64 tokens and a coarser schedule


@dataclass(frozen=True)
class Recovery:
    """Retraining after compression: the recipe's own recover section, else `budget` (a named budget of
    `RECOVERY_BUDGETS`; None: no retraining), with `steps` / `objective` replaced where given."""

    budget: str | None = None
    steps: int | None = None  # 0: no retraining
    objective: str | None = None


@dataclass(frozen=True)
class Evaluation:
    """WikiText-2 test perplexity of the dense, compressed and recovered model."""

    seqlen: int = 1024
    limit: int | None = None  # windows (None: 16, or 4 with --quick)
    dense: dict | None = None  # the dense model's result on the same windows, when an earlier run scored it


@dataclass(frozen=True)
class RunSpec:
    model: str
    recipe: str | Path | Recipe
    outputs: Outputs = field(default_factory=Outputs)
    compute: Compute = field(default_factory=Compute)
    overrides: Overrides = field(default_factory=Overrides)
    recovery: Recovery = field(default_factory=Recovery)
    evaluation: Evaluation | None = None  # None: no perplexity phases
    measure: bool = False  # the final model's running cost against dense (decode, prefill, RSS, bytes)
    seed: int = 0
    resume: bool = False  # continue an interrupted recovery of the recipe's recover section
    progress: bool = True

    @classmethod
    def of(cls, model: str, recipe: str | Path | Recipe, *, evaluate: bool = False, **options) -> RunSpec:
        """A specification from flat keywords, each routed to its group (see the module docstring)."""
        groups: dict[str, dict] = {name: {} for name in _GROUPS}
        top = {}
        for key, value in options.items():
            if key in _ROUTE:
                group, name = _ROUTE[key]
                groups[group][name] = value
            elif key in _TOP:
                top[key] = value
            else:
                raise TypeError(f"unexpected keyword argument '{key}'")
        built = {name: _GROUPS[name](**_paths(kw)) for name, kw in groups.items()}
        evaluation = built.pop("evaluation")
        return cls(model, recipe, **built, evaluation=evaluation if evaluate else None, **top)


def _paths(kw: dict) -> dict:
    """Output paths as Path objects (callers pass strings too)."""
    return {k: Path(v) if k in _PATHS and v is not None else v for k, v in kw.items()}


_GROUPS = {"outputs": Outputs, "compute": Compute, "overrides": Overrides, "recovery": Recovery,
           "evaluation": Evaluation}
_ROUTE = {f.name: (name, f.name) for name, cls in _GROUPS.items() if cls is not Recovery
          for f in dataclasses.fields(cls)}
_ROUTE.update({f"recover_{f.name}": ("recovery", f.name) for f in dataclasses.fields(Recovery)})  # recover_steps
_TOP = {"measure", "seed", "resume", "progress"}
_PATHS = {"out", "dense_out", "gguf_out", "json_path"}
