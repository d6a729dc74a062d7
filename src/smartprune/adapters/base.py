"""What methods, the engine and structured inference ask of a model family.

An adapter converts a Hugging Face model's native layers into smartprune's modules (`Projection`
in the paper's ``d_in x d_out`` orientation, `MaskedEmbedding`), says where each block's
projections are, and runs a model one block (or one sublayer) at a time. Two kinds exist: the
layout adapter (`adapters.layout`), driven by one entry per ``model_type`` of the table in
`adapters.table`, which knows each block's attention and feed-forward roles and so supports the
paper's methods; and the generic adapter (`adapters.generic`), which finds the blocks and their
linear layers of any causal LM from its module tree, enough for the unstructured baselines.

Blocks and attention modules are called with the arguments the model itself passes them (position
embeddings, masks: Gemma 3's sliding-window layers get theirs), captured once per window length
from one forward of a dummy window (`CallCapture`), so no adapter re-implements a model's forward.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from smartprune.device import model_device
from smartprune.modules.masked import MaskedEmbedding, Projection, forward_pre_hooks

# Keyword arguments never replayed: the input itself and any KV cache (captured with use_cache=False).
_NOT_REPLAYED = ("hidden_states", "cache", "past_key_values", "past_key_value", "layer_past", "use_cache")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed was seen."""


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class CallCapture:
    """The positional and keyword arguments (after the hidden states) that the model passes to the
    modules at `paths` for a window of a given length, from one forward pass of a dummy window.

    Arguments captured for one sequence broadcast over a batch in every table family; where they
    may not (`per_batch`: Bloom's ALiBi tensor is laid out batch x heads), they are captured per
    batch size."""

    def __init__(self, model: nn.Module, paths: list[str], per_batch: bool = False) -> None:
        self.model, self.paths, self.per_batch = model, paths, per_batch
        self._seen: dict[tuple[int, int], dict[str, tuple[tuple, dict]]] = {}
        self._moved: dict[tuple[int, int, str, torch.device], tuple[tuple, dict]] = {}

    def capture(self, seqlen: int, batch: int = 1) -> None:
        """Run the dummy window (once per shape; call it while the whole model sits on one device)."""
        shape = (batch if self.per_batch else 1, seqlen)
        if shape in self._seen:
            return
        found: dict[str, tuple[tuple, dict]] = {}

        def recorder(path: str):
            def hook(_module, args, kwargs):
                kw = {k: v for k, v in kwargs.items() if k not in _NOT_REPLAYED}
                found[path] = (tuple(args) if "hidden_states" in kwargs else tuple(args[1:]), kw)
            return hook

        with torch.no_grad(), forward_pre_hooks(((self.model.get_submodule(p), recorder(p)) for p in self.paths),
                                                with_kwargs=True):
            self.model(input_ids=torch.zeros(shape, dtype=torch.long, device=model_device(self.model)), use_cache=False)
        self._seen[shape] = found

    def call(self, path: str, x: Tensor) -> Tensor:
        """The module at `path` on `x` (batch, seqlen, d) with the arguments the model gives it."""
        shape = (x.shape[0] if self.per_batch else 1, x.shape[1])
        self.capture(shape[1], shape[0])
        key = (*shape, path, x.device)
        if key not in self._moved:
            self._moved[key] = _to(self._seen[shape][path], x.device)
        args, kwargs = self._moved[key]
        out = self.model.get_submodule(path)(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class Adapter(ABC):
    """Architecture access for one model (see the module docstring)."""

    ff_size_key: ClassVar[str] = "intermediate_size"  # the config field of the feed-forward width
    sublayers: ClassVar[bool] = True  # False: blocks are compressed whole (roles unknown)
    parallel_residual: bool = False  # GPT-NeoX: attention and feed-forward both read the block input

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # ---- where things are -------------------------------------------------------------------
    @abstractmethod
    def blocks_path(self) -> str: ...

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path())

    def block_path(self, i: int) -> str:
        return f"{self.blocks_path()}.{i}"

    @abstractmethod
    def embedding_paths(self) -> list[str]:
        """Dotted paths of the embedding tables FPP may prune (token, and a plain position table)."""

    @abstractmethod
    def linear_paths(self, i: int) -> dict[str, str]:
        """Every linear role of block `i` (path by role), in data-flow order."""

    @abstractmethod
    def accounting_groups(self, i: int) -> dict[str, list[str]]:
        """Paths of block `i`'s linear layers by accounting group (`smartprune.compression.accounting.GROUPS`)."""

    @abstractmethod
    def prune_groups(self, scope: str, roles: list[str]) -> list[list[str]]:
        """`roles` of a sublayer in data-flow groups: each group reads the same input, earlier groups
        feed later ones (the baselines prune group by group)."""

    # ---- how a model runs, one piece at a time ---------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """Hidden states entering block 0 (the model's own embedding code, stopped at block 0)."""
        seen: list[Tensor] = []

        def stop(_module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        with contextlib.suppress(_Stop), forward_pre_hooks([(self.blocks()[0], stop)], with_kwargs=True):
            self.model(input_ids=ids, use_cache=False)
        return seen[0]

    @abstractmethod
    def run_block(self, i: int, h: Tensor) -> Tensor:
        """Block `i` on its input hidden states."""

    @abstractmethod
    def head(self, h: Tensor) -> Tensor:
        """Logits from the last block's output (final norm, then output head)."""

    def forward_logits(self, ids: Tensor) -> Tensor:
        """The model's logits computed block by block (equals the model's own forward)."""
        h = self.embed(ids)
        for i in range(len(self.blocks())):
            h = self.run_block(i, h)
        return self.head(h)

    @abstractmethod
    def prepare_calls(self, seqlen: int, batches: set[int]) -> None:
        """Capture the arguments blocks are called with for windows of `seqlen` tokens, in batches of
        the given sizes, now (before the model is spread over devices)."""

    # ---- conversion ------------------------------------------------------------------------------
    @abstractmethod
    def conv1d(self, path: str) -> bool:
        """Whether the native layer at `path` is a GPT-2-style ``Conv1D`` (weight stored d_in x d_out)."""

    def to_projection(self, native: nn.Module, path: str) -> Projection:
        w = native.weight.detach()
        return Projection(w if self.conv1d(path) else w.t(), None if native.bias is None else native.bias.detach())

    def to_native(self, proj: Projection, path: str) -> nn.Module:
        w = proj.dense_weight()
        if self.conv1d(path):
            layer = Conv1D(proj.d_out, proj.d_in)
            layer.weight.data = w.clone()
        else:
            layer = nn.Linear(proj.d_in, proj.d_out, bias=proj.bias is not None)
            layer.weight.data = w.t().contiguous().clone()
        if proj.bias is not None:
            layer.bias.data = proj.bias.detach().clone()
        return layer

    def prepare(self) -> None:
        """Turn native layers into smartprune modules (idempotent: smartprune's own modules, packed
        and structured ones included, are left as they are)."""
        for path in self.embedding_paths():
            emb = self.model.get_submodule(path)
            if type(emb) is not MaskedEmbedding and isinstance(emb, nn.Embedding):
                set_module(self.model, path, MaskedEmbedding(emb))
        for i in range(len(self.blocks())):
            for path in self.linear_paths(i).values():
                mod = self.model.get_submodule(path)
                if isinstance(mod, nn.Linear | Conv1D):
                    set_module(self.model, path, self.to_projection(mod, path))

    def materialize(self) -> None:
        """Turn smartprune modules back into native dense layers holding the effective weights."""
        for path in self.embedding_paths():
            emb = self.model.get_submodule(path)
            if isinstance(emb, MaskedEmbedding):
                set_module(self.model, path, emb.plain())
        for i in range(len(self.blocks())):
            for path in self.linear_paths(i).values():
                mod = self.model.get_submodule(path)
                if isinstance(mod, Projection):
                    set_module(self.model, path, self.to_native(mod, path))

    # ---- typed access after prepare() -------------------------------------------------------------
    def embeddings(self) -> dict[str, MaskedEmbedding]:
        return {p: self.model.get_submodule(p) for p in self.embedding_paths()}

    def replace(self, path: str, module: nn.Module) -> None:
        """Swap the module at `path` (methods use it to install a `FoldedProjection`)."""
        set_module(self.model, path, module)

    def keep_blocks(self, keep: list[int]) -> None:
        """Remove every block not in `keep` (depth pruning): the block list, each kept block's
        ``layer_idx`` (the KV cache is indexed by it), the config's layer count and per-layer types."""
        blocks = self.blocks()
        kept = nn.ModuleList([blocks[i] for i in keep])
        for new, block in enumerate(kept):
            for m in block.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new
        set_module(self.model, self.blocks_path(), kept)
        self.config.num_hidden_layers = len(keep)
        types = getattr(self.config, "layer_types", None)
        if types is not None and len(types) == len(blocks):
            self.config.layer_types = [types[i] for i in keep]

    @contextmanager
    def without_blocks(self, drop: set[int]) -> Iterator[None]:
        """The model with the blocks in `drop` skipped, then exactly as it was (depth scoring)."""
        blocks, n = self.blocks(), self.config.num_hidden_layers
        types = getattr(self.config, "layer_types", None)
        idx = [(m, m.layer_idx) for b in blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        self.keep_blocks([i for i in range(len(blocks)) if i not in drop])
        try:
            yield
        finally:
            set_module(self.model, self.blocks_path(), blocks)
            for m, i in idx:
                m.layer_idx = i
            self.config.num_hidden_layers = n
            if types is not None:
                self.config.layer_types = types

    def block_sizes(self) -> dict[str, set[int]]:
        """Config field -> the values the blocks have for it now (one value: a standard config holds it)."""
        return {}

    def sync_config(self) -> None:
        """Write the blocks' sizes into the config wherever every block agrees (after structured pruning),
        so the saved config describes the smaller model."""
        for key, values in self.block_sizes().items():
            if len(values) == 1:
                setattr(self.config, key, next(iter(values)))

    def ff_intermediate_size(self, i: int) -> int | None:
        """Block `i`'s feed-forward width (smaller than the config's after structured FPP); None
        where the roles are unknown."""
        return None

    def structured_reason(self, i: int) -> str | None:
        """Why block `i`'s attention keeps the reference path, or None when a structured one applies."""
        return "no adapter entry: the attention's roles are unknown"

    def structured_attention(self, i: int) -> tuple[str, nn.Module] | None:
        """(path, module): a structured replacement of block `i`'s attention module, or None."""
        return None


__all__ = ["Adapter", "CallCapture", "set_module"]
