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

SCOPES = ("embedding", "attention", "ff")


@dataclass(frozen=True)
class MethodSpec:
    key: str
    scope: str  # one of SCOPES
    stage: type[Stage]
    summary: str


METHODS: dict[str, MethodSpec] = {
    spec.key: spec
    for spec in (
        MethodSpec("fpp_emb", "embedding", FPPStage, "Forward Propagation Pruning of the embedding table(s)"),
        MethodSpec("irc", "attention", IRCStage, "Identical Row Compression of W_Q / W_K"),
        MethodSpec("dwc", "attention", DWCStage, "Diagonal Weight Compression of W_V"),
        MethodSpec("fpp_ff", "ff", FPPStage, "Forward Propagation Pruning of the feed-forward matrices"),
    )
}

__all__ = ["METHODS", "SCOPES", "MethodSpec", "Stage"]
