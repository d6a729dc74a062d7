"""The adapter for families in the table (`adapters.table`): every block is a pre-norm residual
``h += attn(norm1(h)); h += ff(norm2(h))`` (or both on ``h`` with a parallel residual), each
sublayer optionally followed by its own norm (Gemma 3), with named Q/K/V/O and feed-forward roles.
A `Layout` says where things are; this class does the rest, the same way for every family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from smartprune.adapters.base import Adapter, CallCapture, set_module
from smartprune.modules.masked import FusedProjections, Projection
from smartprune.modules.structured import HeadNorm, IRCAttention, Rope, fully_folded


@dataclass
class AttentionProjections:
    """The four projections of one attention block (all `Projection` after `prepare`)."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection

    def as_dict(self) -> dict[str, Projection]:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}


@dataclass(frozen=True)
class Fused:
    """A native layer computing several roles at once (path within the block, roles in output
    order), split on conversion; ``per_head``: its output rows are grouped per head (GPT-NeoX)."""

    path: str
    roles: tuple[str, ...]
    per_head: bool = False


@dataclass(frozen=True)
class Layout:
    """Where one family keeps things. Paths of sublayer parts are relative to the block; a role of a
    fused layer is addressed as ``<fused path>.<role>``."""

    blocks: str  # the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # tables FPP may prune (plain nn.Embedding lookups)
    attention_module: str
    attention: dict[str, str]  # q, k, v, o
    ff: dict[str, str]  # input projections first, the output projection last
    attn_norm: str
    ff_norm: str
    final: tuple[str, ...]  # model paths applied after the last block: norm, head ("path?": where present)
    ff_module: str | None = "mlp"  # None: the feed-forward is `feed_forward(block, x)` (OPT has no module)
    feed_forward: Callable[[nn.Module, Tensor], Tensor] | None = None
    post_attn_norm: str | None = None  # a norm on the attention's output before the residual (Gemma 3)
    post_ff_norm: str | None = None
    fused: tuple[Fused, ...] = ()
    conv1d: bool = False  # GPT-2: weights stored d_in x d_out
    rotary: str | None = None  # model path of the rotary module
    qk_norm: tuple[str, str] | None = None  # per-head norms after Q and K, within the attention module
    ff_size_key: str = "intermediate_size"
    parallel_residual: str | None = None  # the config flag that turns the parallel residual on
    requires: tuple[tuple[str, object, str], ...] = ()  # (config field, value required, what breaks otherwise)

    def unsupported(self, config) -> str | None:
        """Why the paper's methods cannot run on a model with `config`, or None."""
        for key, value, why in self.requires:
            if getattr(config, key, value) != value:
                return f"{key}={getattr(config, key)!r}: {why}"
        return None


def head_sizes(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a config, whatever the family calls them."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return heads, kv, getattr(config, "head_dim", None) or hidden // heads


class LayoutAdapter(Adapter):
    """An adapter driven by a `Layout` (see `adapters.table`)."""

    def __init__(self, model: nn.Module, layout: Layout) -> None:
        super().__init__(model)
        self.layout = layout
        self.ff_size_key = layout.ff_size_key
        self.parallel_residual = bool(layout.parallel_residual and getattr(self.config, layout.parallel_residual))
        self.calls = CallCapture(model, [self.attention_module_path(i) for i in range(len(self.blocks()))])

    # ---- where things are -------------------------------------------------------------------
    def blocks_path(self) -> str:
        return self.layout.blocks

    def embedding_paths(self) -> list[str]:
        return list(self.layout.embeddings)

    def attention_paths(self, i: int) -> dict[str, str]:
        """Paths of block `i`'s q/k/v/o, relative to the model (the output projection last)."""
        return {r: f"{self.block_path(i)}.{p}" for r, p in self.layout.attention.items()}

    def ff_paths(self, i: int) -> dict[str, str]:
        """Paths of block `i`'s feed-forward layers in data-flow order (the output projection last)."""
        return {r: f"{self.block_path(i)}.{p}" for r, p in self.layout.ff.items()}

    def linear_paths(self, i: int) -> dict[str, str]:
        return {**self.attention_paths(i), **self.ff_paths(i)}

    def attention_module_path(self, i: int) -> str:
        return f"{self.block_path(i)}.{self.layout.attention_module}"

    def accounting_groups(self, i: int) -> dict[str, list[str]]:
        a = self.attention_paths(i)
        return {"irc": [a["q"], a["k"]], "dwc": [a["v"]], "attn_out": [a["o"]],
                "fpp_ff": list(self.ff_paths(i).values())}

    def prune_groups(self, scope: str, roles: list[str]) -> list[list[str]]:
        return [roles[:-1], roles[-1:]]  # q, k, v then o; the input projections then the output one

    def attention_projections(self, i: int) -> AttentionProjections:
        return AttentionProjections(**{k: self.model.get_submodule(p) for k, p in self.attention_paths(i).items()})

    def ff_projections(self, i: int) -> dict[str, Projection]:
        return {k: self.model.get_submodule(p) for k, p in self.ff_paths(i).items()}

    # ---- how a block runs ------------------------------------------------------------------------
    def _part(self, i: int, name: str | None) -> nn.Module | None:
        return None if name is None else self.blocks()[i].get_submodule(name)

    def attn_norm(self, i: int) -> nn.Module:
        return self._part(i, self.layout.attn_norm)

    def ff_norm(self, i: int) -> nn.Module:
        return self._part(i, self.layout.ff_norm)

    def attention(self, i: int, x: Tensor) -> Tensor:
        """Block `i`'s causal self-attention on normalized input `x` (batch, seq, d), with the
        arguments the model passes it (RoPE tables, sliding-window masks), then its output norm."""
        out = self.calls.call(self.attention_module_path(i), x)
        post = self._part(i, self.layout.post_attn_norm)
        return out if post is None else post(out)

    def feed_forward(self, i: int, x: Tensor) -> Tensor:
        block = self.blocks()[i]
        ff = self.layout.feed_forward
        out = ff(block, x) if ff is not None else block.get_submodule(self.layout.ff_module)(x)
        post = self._part(i, self.layout.post_ff_norm)
        return out if post is None else post(out)

    def run_block(self, i: int, h: Tensor) -> Tensor:
        a = self.attention(i, self.attn_norm(i)(h))
        if self.parallel_residual:
            return h + a + self.feed_forward(i, self.ff_norm(i)(h))
        h = h + a
        return h + self.feed_forward(i, self.ff_norm(i)(h))

    def head(self, h: Tensor) -> Tensor:
        for path in self.layout.final:
            module = _optional(self.model, path[:-1]) if path.endswith("?") else self.model.get_submodule(path)
            if module is not None:
                h = module(h)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return h if cap is None else torch.tanh(h / cap) * cap

    def prepare_calls(self, seqlen: int, batches: set[int]) -> None:
        for b in batches:
            self.calls.capture(seqlen, b)

    # ---- conversion ------------------------------------------------------------------------------
    def conv1d(self, path: str) -> bool:
        return self.layout.conv1d

    def _split_sizes(self, fused: Fused, rows: int) -> list[int]:
        heads, kv, hd = head_sizes(self.config)
        width = {"q": heads * hd, "k": kv * hd, "v": kv * hd}
        if all(r in width for r in fused.roles) and sum(width[r] for r in fused.roles) == rows:
            return [width[r] for r in fused.roles]
        return [rows // len(fused.roles)] * len(fused.roles)  # equal parts (gate and up; GPT-2's q, k, v)

    def prepare(self) -> None:
        self.split_fused()  # first, so the generic conversion finds each role at "<fused path>.<role>"
        super().prepare()

    def materialize(self) -> None:
        super().materialize()
        self.join_fused()

    def split_fused(self) -> None:
        """Split native layers that compute several roles at once into a `FusedProjections`."""
        heads = head_sizes(self.config)[0]
        for block in self.blocks():
            for f in self.layout.fused:
                native = block.get_submodule(f.path)
                if not isinstance(native, nn.Linear | Conv1D):  # split already (or not a native layer)
                    continue
                rows = native.weight.detach().t() if self.layout.conv1d else native.weight.detach()  # d_out x d_in
                b = None if native.bias is None else native.bias.detach()
                per_head = heads if f.per_head else None
                sizes = self._split_sizes(f, rows.shape[0])
                ws = FusedProjections.split_rows(rows, sizes, per_head)
                bs = FusedProjections.split_rows(b, sizes, per_head) if b is not None else [None] * len(sizes)
                parts = {r: Projection(wi.t(), bi) for r, wi, bi in zip(f.roles, ws, bs, strict=True)}
                set_module(block, f.path, FusedProjections(parts, per_head))

    def join_fused(self) -> None:
        """Undo `split_fused` (after `materialize` made each role a native layer again)."""
        for block in self.blocks():
            for f in self.layout.fused:
                fused = block.get_submodule(f.path)
                if not isinstance(fused, FusedProjections):
                    continue
                natives = fused.parts()  # already native layers (materialize converted each role)
                rows = [n.weight.detach().t() if self.layout.conv1d else n.weight.detach() for n in natives]
                w = FusedProjections.join_rows(rows, fused.heads).t()  # d_in x d_out
                bias = natives[0].bias is not None
                b = FusedProjections.join_rows([n.bias.detach() for n in natives], fused.heads) if bias else None
                set_module(block, f.path, self.to_native(Projection(w, b), f.path))

    # ---- structured inference --------------------------------------------------------------------
    def rope(self, i: int) -> Rope | None:
        """Block `i`'s rotary frequencies and scaling (per layer type where the model has several)."""
        if self.layout.rotary is None:
            return None
        rot = self.model.get_submodule(self.layout.rotary)
        types = getattr(self.config, "layer_types", None)
        prefix = f"{types[i]}_" if types and hasattr(rot, f"{types[i]}_inv_freq") else ""
        return Rope(getattr(rot, f"{prefix}inv_freq"), float(getattr(rot, f"{prefix}attention_scaling", 1.0)))

    def head_norms(self, i: int) -> tuple[HeadNorm | None, HeadNorm | None]:
        if self.layout.qk_norm is None:
            return None, None
        attn = self.model.get_submodule(self.attention_module_path(i))
        norms = [attn.get_submodule(p) for p in self.layout.qk_norm]
        return tuple(HeadNorm(n, float(getattr(n, "variance_epsilon", getattr(n, "eps", 1e-6)))) for n in norms)

    def structured_reason(self, i: int) -> str | None:
        """Why block `i`'s attention keeps the reference path, or None when IRC attention applies."""
        try:
            a = self.attention_projections(i)
        except AttributeError:  # not converted (prepare() not run): nothing is folded
            return "not converted"
        if not (fully_folded(a.q) and fully_folded(a.k)):
            return "Q and K are not fully folded"
        if self.layout.rotary is not None and (a.q.bias is not None or a.k.bias is not None):
            return "RoPE with a Q/K bias (Qwen 2, GPT-NeoX) has no closed offset form here"
        if getattr(self.config, "attn_logit_softcapping", None) is not None:
            return "attention logit soft-capping is not a function of the scores' structure"
        return None

    def structured_attention(self, i: int) -> tuple[str, nn.Module] | None:
        """(path, `IRCAttention`) for block `i` when its Q and K are fully folded, else None."""
        if self.structured_reason(i) is not None:
            return None
        a = self.attention_projections(i)
        heads, kv, hd = head_sizes(self.config)
        native = self.model.get_submodule(self.attention_module_path(i))
        q_norm, k_norm = self.head_norms(i)
        return self.attention_module_path(i), IRCAttention(
            a.q, a.k, a.v, a.o, n_heads=heads, n_kv=kv, head_dim=hd, layer_idx=i, rope=self.rope(i),
            scaling=getattr(native, "scaling", None), q_norm=q_norm, k_norm=k_norm)

    def fused_attention(self) -> bool:
        """Q, K and V computed by one native layer (GPT-2, Phi-3, GPT-NeoX)."""
        return any("q" in f.roles for f in self.layout.fused)

    def head_counts(self, i: int) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim) of block `i` as its projections are now."""
        hd = head_sizes(self.config)[2]
        a = self.attention_paths(i)
        q, k = (self.model.get_submodule(a[r]) for r in ("q", "k"))
        return _width(q) // hd, _width(k) // hd, hd

    def set_head_counts(self, i: int, heads: int, kv: int) -> None:
        """Tell block `i`'s attention module its new head counts (it splits heads by its attributes)."""
        attn = self.model.get_submodule(self.attention_module_path(i))
        for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv),
                            ("num_key_value_groups", heads // kv)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def block_sizes(self) -> dict[str, set[int]]:
        n = range(len(self.blocks()))
        sizes = {self.ff_size_key: {self.ff_intermediate_size(i) for i in n}}
        if not self.fused_attention():
            counts = {self.head_counts(i) for i in n}
            sizes.update({"num_attention_heads": {c[0] for c in counts}, "num_key_value_heads": {c[1] for c in counts},
                          "head_dim": {c[2] for c in counts}})
            if sizes["num_attention_heads"] == {head_sizes(self.config)[0]} and \
                    sizes["num_key_value_heads"] == {head_sizes(self.config)[1]}:
                del sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["head_dim"]  # unchanged
        return sizes

    def ff_intermediate_size(self, i: int) -> int:
        *_, down = (self.model.get_submodule(p) for p in self.ff_paths(i).values())
        if isinstance(down, Projection):
            return down.d_in
        return down.weight.shape[0] if self.layout.conv1d else down.in_features


def _optional(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _width(m: nn.Module) -> int:
    """Output features of a projection, native or converted."""
    return m.d_out if isinstance(m, Projection) else m.out_features
