"""The one place architecture differences live.

An adapter converts a Hugging Face model's native layers into smartprune's modules
(`Projection` in the paper's ``d_in x d_out`` orientation, `MaskedEmbedding`), exposes each block's
attention projections, feed-forward projections and the embeddings, and runs a block one sublayer
at a time. Every supported family is pre-norm: ``h += attn(norm1(h)); h += ff(norm2(h))``, so the
base class composes blocks and a subclass only says where things are and how attention is called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from smartprune.inference import IRCAttention, fully_folded
from smartprune.nn import FusedProjections, MaskedEmbedding, Projection


@dataclass
class AttentionProjections:
    """The four projections of one attention block (all `Projection` after `prepare`)."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection

    def as_dict(self) -> dict[str, Projection]:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class Adapter(ABC):
    """Architecture access for one model family, keyed by ``config.model_type``."""

    model_types: ClassVar[tuple[str, ...]]
    ff_size_key: ClassVar[str] = "intermediate_size"  # the config field of the feed-forward width

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ---- where things are -------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> nn.ModuleList: ...

    @abstractmethod
    def embedding_paths(self) -> list[str]:
        """Dotted paths of the embedding tables (token, and position where the model has one)."""

    @abstractmethod
    def attention_paths(self, i: int) -> dict[str, str]:
        """Paths of block `i`'s native q/k/v/o layers, relative to the model, in data-flow order
        (the output projection last: the baselines prune in this order)."""

    @abstractmethod
    def ff_paths(self, i: int) -> dict[str, str]:
        """Paths of block `i`'s native feed-forward layers, relative to the model, in data-flow order
        (the output projection last)."""

    # ---- how a block runs ----------------------------------------------------------------------
    @abstractmethod
    def embed(self, ids: Tensor) -> Tensor:
        """Hidden states entering block 0."""

    @abstractmethod
    def attn_norm(self, i: int) -> nn.Module: ...

    @abstractmethod
    def ff_norm(self, i: int) -> nn.Module: ...

    @abstractmethod
    def attention(self, i: int, x: Tensor) -> Tensor:
        """Block `i`'s causal self-attention on normalized input `x` (batch, seq, d)."""

    def feed_forward(self, i: int, x: Tensor) -> Tensor:
        return self.blocks()[i].mlp(x)

    @abstractmethod
    def head(self, h: Tensor) -> Tensor:
        """Logits from the last block's output (final norm, then output head)."""

    # ---- conversion ------------------------------------------------------------------------------
    @abstractmethod
    def _to_projection(self, native: nn.Module) -> Projection: ...

    @abstractmethod
    def _to_native(self, proj: Projection) -> nn.Module: ...

    def prepare(self) -> None:
        """Turn native layers into smartprune modules (idempotent)."""
        for path in self.embedding_paths():
            emb = self.model.get_submodule(path)
            if not isinstance(emb, MaskedEmbedding):
                _set(self.model, path, MaskedEmbedding(emb))
        for i in range(len(self.blocks())):
            for path in [*self.attention_paths(i).values(), *self.ff_paths(i).values()]:
                mod = self.model.get_submodule(path)
                if not isinstance(mod, Projection):
                    _set(self.model, path, self._to_projection(mod))

    def materialize(self) -> None:
        """Turn smartprune modules back into native dense layers holding the effective weights."""
        for path in self.embedding_paths():
            emb = self.model.get_submodule(path)
            if isinstance(emb, MaskedEmbedding):
                _set(self.model, path, emb.plain())
        for i in range(len(self.blocks())):
            for path in [*self.attention_paths(i).values(), *self.ff_paths(i).values()]:
                mod = self.model.get_submodule(path)
                if isinstance(mod, Projection):
                    _set(self.model, path, self._to_native(mod))

    # ---- typed access after prepare() -------------------------------------------------------------
    def embeddings(self) -> dict[str, MaskedEmbedding]:
        return {p: self.model.get_submodule(p) for p in self.embedding_paths()}

    def attention_projections(self, i: int) -> AttentionProjections:
        return AttentionProjections(**{k: self.model.get_submodule(p) for k, p in self.attention_paths(i).items()})

    def ff_projections(self, i: int) -> dict[str, Projection]:
        return {k: self.model.get_submodule(p) for k, p in self.ff_paths(i).items()}

    # ---- structured inference (smartprune.inference) ---------------------------------------------
    @abstractmethod
    def attention_module_path(self, i: int) -> str:
        """Path of block `i`'s whole attention module (what structured inference replaces)."""

    def rotary(self) -> nn.Module | None:
        """The model's rotary-embedding module (with ``inv_freq``), or None without RoPE."""
        return None

    def structured_attention(self, i: int) -> nn.Module | None:
        """An `IRCAttention` for block `i` when its Q and K are fully folded, else None."""
        try:
            a = self.attention_projections(i)
        except AttributeError:  # not converted (prepare() not run): nothing is folded
            return None
        if not (fully_folded(a.q) and fully_folded(a.k)):
            return None
        rope = self.rotary()
        if rope is not None and (a.q.bias is not None or a.k.bias is not None):
            return None  # RoPE with a Q/K bias (Qwen2) has no closed offset form here: keep the reference path
        c = self.config
        heads = c.num_attention_heads
        return IRCAttention(a.q, a.k, a.v, a.o, n_heads=heads, n_kv=getattr(c, "num_key_value_heads", None) or heads,
                            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, layer_idx=i, rope=rope)

    def ff_intermediate_size(self, i: int) -> int:
        """Block `i`'s feed-forward width (smaller than the config's after structured FPP)."""
        *_, down = (self.model.get_submodule(p) for p in self.ff_paths(i).values())
        if isinstance(down, Projection):
            return down.d_in
        return down.in_features if isinstance(down, nn.Linear) else down.weight.shape[0]  # GPT-2 Conv1D: d_in x d_out

    def replace(self, path: str, module: nn.Module) -> None:
        """Swap the module at `path` (methods use it to install a `FoldedProjection`)."""
        _set(self.model, path, module)

    # ---- whole-model helpers ---------------------------------------------------------------------
    def run_block(self, i: int, h: Tensor) -> Tensor:
        h = h + self.attention(i, self.attn_norm(i)(h))
        return h + self.feed_forward(i, self.ff_norm(i)(h))

    def forward_logits(self, ids: Tensor) -> Tensor:
        """The model's logits computed block by block (equals the model's own forward)."""
        h = self.embed(ids)
        for i in range(len(self.blocks())):
            h = self.run_block(i, h)
        return self.head(h)


def positions(x: Tensor) -> Tensor:
    """Position ids 0..seq-1 for a (batch, seq, ...) tensor."""
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


# GPT-2's fused c_attn is split on conversion; its three parts are addressed as path + ".q" etc.
__all__ = ["Adapter", "AttentionProjections", "FusedProjections", "positions"]
