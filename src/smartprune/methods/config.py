"""What every method's configuration shares: the validated field helper (`option`), the re-fitting
settings (`FitConfig`), the strategy (`StrategyConfig`) and N:M patterns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from smartprune.options import option


@dataclass(frozen=True)
class FitConfig:
    """How a stage re-optimizes the weights it compressed (shared by every paper method)."""

    steps: int = option(5, "Adam steps after each compression increment (0 = direct compression)", lo=0, hi=100_000)
    lr: float = option(5e-5, "Adam learning rate (Table 2: 5e-5)", lo=0.0, hi=1.0)
    batch_size: int = option(8, "calibration sequences per Adam step", lo=1, hi=100_000)
    cumulative: str = option("window", "cumulative loss: window | value | off (readings: smartprune/methods/fit.py)",
                             choices=("window", "value", "off"))
    window: int = option(1, "previous batches summed into the loss when cumulative=window", lo=1, hi=64)
    objective: str = option("local", "local (fit the dense sublayer output) | task (the model's own loss)",
                            choices=("local", "task"))


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M): N zeros in every group of M consecutive inputs."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise ValueError(f"pattern: {pattern!r} is neither 'unstructured' nor 'N:M' with 0 < N < M (e.g. 2:4)")


class NMPattern:
    """A stage with a ``pattern`` field (FPP, the pruning baselines): ``nm`` is the parsed pattern, and an
    N:M pattern fixes the stage's rate (its ``rate_field``) to N/M."""

    pattern: str
    rate_field: ClassVar[str]

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def _rate_from_pattern(self) -> None:
        if self.nm is not None:
            object.__setattr__(self, self.rate_field, self.nm[0] / self.nm[1])


@dataclass(frozen=True)
class StrategyConfig:
    """Sequential (Eq. 3) and recursive (Algorithm 1) strategies."""

    sequential: bool = option(True, "propagate calibration activations through the compressed prefix")
    recursive: bool = option(True, "grow each stage's rate step by step and keep the best state")
    step: float = option(0.05, "rate increment of the recursive schedule (IRC, DWC)", lo=1e-6, hi=1.0)
    threshold: float | None = option(None, "tolerated degradation relative to dense (null = always accept)",
                                     lo=0.0, hi=1e9)
    metric: str = option("local", "what the threshold is checked on: local (sublayer relative error) | "
                         "perplexity (model, held-out calibration)", choices=("local", "perplexity"))


