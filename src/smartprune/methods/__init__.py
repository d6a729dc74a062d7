"""The method registry: recipe stage key -> where it acts, its stage class, its accounting group.

Adding a method means adding a Stage subclass and one entry here; the engine dispatches on the
entry's scope, never on the method's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from smartprune.methods.base import Stage
from smartprune.methods.dwc import DWCStage
from smartprune.methods.fpp import FPPStage
from smartprune.methods.irc import IRCStage
from smartprune.methods.magnitude import MagnitudeStage
from smartprune.methods.sparsegpt import SparseGPTStage
from smartprune.methods.wanda import WandaStage

# "block": a whole block at once, for models without an adapter entry (their roles are unknown)
SCOPES = ("embedding", "attention", "ff", "block")
BLOCK_LINEARS = ("attention", "ff", "block")


@dataclass(frozen=True)
class MethodSpec:
    key: str
    scopes: tuple[str, ...]  # where the engine runs it, from SCOPES
    stage: type[Stage]
    summary: str
    baseline: bool = False  # a peer method (one shot on every block linear), not the paper's


METHODS: dict[str, MethodSpec] = {
    spec.key: spec
    for spec in (
        MethodSpec("fpp_emb", ("embedding",), FPPStage, "Forward Propagation Pruning of the embedding table(s)"),
        MethodSpec("irc", ("attention",), IRCStage, "Identical Row Compression of W_Q / W_K"),
        MethodSpec("dwc", ("attention",), DWCStage, "Diagonal Weight Compression of W_V"),
        MethodSpec("fpp_ff", ("ff",), FPPStage, "Forward Propagation Pruning of the feed-forward matrices"),
        MethodSpec("magnitude", BLOCK_LINEARS, MagnitudeStage, "magnitude pruning of every block linear", True),
        MethodSpec("wanda", BLOCK_LINEARS, WandaStage, "Wanda: |W| x input norm, per output", True),
        MethodSpec("sparsegpt", BLOCK_LINEARS, SparseGPTStage, "SparseGPT: OBS with the layer Hessian", True),
    )
}

__all__ = ["BLOCK_LINEARS", "METHODS", "SCOPES", "MethodSpec", "Stage"]
