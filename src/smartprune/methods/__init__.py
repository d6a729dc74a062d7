"""The method registry: recipe stage key -> where it acts, its stage class and its config class.

Adding a method means one file (its config dataclass beside its Stage subclass) and one entry here;
the engine dispatches on the entry's scope, never on the method's name, and every list of stage keys
(the recipe schema's, the baselines') is derived from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from smartprune.methods.base import ModelStage, Stage
from smartprune.methods.config import FitConfig
from smartprune.methods.depth import DepthConfig, DepthStage
from smartprune.methods.dwc import DWCConfig, DWCStage
from smartprune.methods.fpp import FPPConfig, FPPStage
from smartprune.methods.heads import HeadsConfig, HeadsStage
from smartprune.methods.irc import IRCConfig, IRCStage
from smartprune.methods.magnitude import MagnitudeConfig, MagnitudeStage
from smartprune.methods.neurons import NeuronsConfig, NeuronsStage
from smartprune.methods.sparsegpt import SparseGPTConfig, SparseGPTStage
from smartprune.methods.wanda import WandaConfig, WandaStage

# "block": a whole block at once, for models without an adapter entry (their roles are unknown);
# "model": the model as a whole, before the rest (removing blocks)
SCOPES = ("model", "embedding", "attention", "ff", "block")
BLOCK_LINEARS = ("attention", "ff", "block")


@dataclass(frozen=True)
class MethodSpec:
    key: str
    scopes: tuple[str, ...]  # where the engine runs it, from SCOPES
    stage: type[Stage] | type[ModelStage]
    config: type[FitConfig] | type[DepthConfig]  # the recipe section's dataclass
    summary: str
    baseline: bool = False  # a peer method (one shot on every block linear), not the paper's
    structured: bool = False  # its result is a smaller standard architecture (exportable anywhere)


METHODS: dict[str, MethodSpec] = {
    spec.key: spec
    for spec in (
        MethodSpec("fpp_emb", ("embedding",), FPPStage, FPPConfig,
                   "Forward Propagation Pruning of the embedding table(s)"),
        MethodSpec("irc", ("attention",), IRCStage, IRCConfig, "Identical Row Compression of W_Q / W_K"),
        MethodSpec("dwc", ("attention",), DWCStage, DWCConfig, "Diagonal Weight Compression of W_V"),
        MethodSpec("fpp_ff", ("ff",), FPPStage, FPPConfig,
                   "Forward Propagation Pruning of the feed-forward matrices"),
        MethodSpec("magnitude", BLOCK_LINEARS, MagnitudeStage, MagnitudeConfig,
                   "magnitude pruning of every block linear", True),
        MethodSpec("wanda", BLOCK_LINEARS, WandaStage, WandaConfig, "Wanda: |W| x input norm, per output", True),
        MethodSpec("sparsegpt", BLOCK_LINEARS, SparseGPTStage, SparseGPTConfig,
                   "SparseGPT: OBS with the layer Hessian", True),
        MethodSpec("depth", ("model",), DepthStage, DepthConfig,
                   "whole blocks removed by the held-out loss of skipping each", structured=True),
        MethodSpec("attn_heads", ("attention",), HeadsStage, HeadsConfig,
                   "whole attention heads (GQA-aware) removed by their output contribution", structured=True),
        MethodSpec("ff_neurons", ("ff",), NeuronsStage, NeuronsConfig,
                   "whole feed-forward neurons removed by their output contribution", structured=True),
    )
}

STRUCTURED = tuple(key for key, spec in METHODS.items() if spec.structured)

__all__ = ["BLOCK_LINEARS", "METHODS", "SCOPES", "STRUCTURED", "MethodSpec", "ModelStage", "Stage"]
