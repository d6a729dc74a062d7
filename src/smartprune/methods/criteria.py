"""Every criterion that ranks weights or units, written once: its score, what it needs, and which
parts of the package offer it. Stages, FPP, the allocation's sensitivity measurement and the recipe
schema's choice lists read this table instead of repeating names and formulas.

Scores are "lower goes first" and take a matrix in either layout: `inputs` names the axis of its
input features (0 for ``d_in x d_out``, the paper's layout; 1 for ``d_out x d_in``, torch's).
Unit scores (whole neurons, whole heads: ``activation``, ``magnitude``) live beside their stages
(methods/neurons.py, methods/heads.py), which measure them on the sublayer; their names are here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Criterion:
    name: str
    doc: str
    needs: str  # weights | input activations | lookups | outputs
    offered: tuple[str, ...]  # fpp (weights), units (neurons, heads), embedding (allocation), blocks (allocation)


CRITERIA = {c.name: c for c in (
    Criterion("activation", "squared output contribution on the calibration tokens", "outputs", ("units",)),
    Criterion("magnitude", "closest to zero (|W|; for units, the weight norm)", "weights",
              ("fpp", "units", "embedding", "blocks")),
    Criterion("literal", "largest of each sign (the paper's Algorithm 2 as printed)", "weights", ("fpp",)),
    Criterion("wanda", "|W| x the input feature's norm on the calibration tokens", "input activations",
              ("fpp", "blocks")),
    Criterion("obs", "SparseGPT's score w^2 / [H^-1]_ii^2, survivors updated", "input activations", ("fpp",)),
    Criterion("frequency", "embedding rows: |E| x sqrt(1 + how often the row is looked up)", "lookups",
              ("fpp", "embedding")),
)}


def offered(where: str) -> tuple[str, ...]:
    """The criteria a part of the package offers (a schema option's choices)."""
    return tuple(name for name, c in CRITERIA.items() if where in c.offered)


def needing(needs: str) -> tuple[str, ...]:
    return tuple(name for name, c in CRITERIA.items() if c.needs == needs)


def _along_inputs(values: Tensor, weight: Tensor, inputs: int) -> Tensor:
    """A per-input-feature vector shaped to broadcast over `weight`."""
    return values[:, None] if inputs == 0 else values[None, :]


def wanda_score(weight: Tensor, feature_norms: Tensor, inputs: int = 0) -> Tensor:
    """Wanda (Sun et al. 2023): |W_ij| times the norm of input feature i over the calibration tokens."""
    w = weight.detach().abs()
    return w * _along_inputs(feature_norms.to(w.dtype), w, inputs)


def frequency_score(weight: Tensor, lookups: Tensor) -> Tensor:
    """An embedding table's entries: |E| times sqrt(1 + how often its row is looked up)."""
    w = weight.detach()
    return w.abs() * (1 + lookups.to(w.dtype)).sqrt()[:, None]


def obs_score(weight: Tensor, factor: Tensor, inputs: int = 0) -> Tensor:
    """SparseGPT's (OBS) score w^2 / [H^-1]_ii^2, with `factor` the Cholesky factor of H^-1 (its
    diagonal is [H^-1]_ii's square root after the sweep's eliminations)."""
    w = weight.detach().double()
    return w.pow(2) / _along_inputs(factor.diagonal().pow(2), w, inputs)
