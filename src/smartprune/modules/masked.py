"""The modules compressed weights live in.

Every targeted weight is held in the paper's orientation: a projection computes ``x @ W + b`` with
``W`` of shape ``d_in x d_out`` (what GPT-2's Conv1D stores; ``nn.Linear`` stores ``W^T``). Adapters
turn a model's native layers into these modules and back, so methods see one layout only.

Pruned entries are recorded in a boolean ``mask`` (True = alive) and are exactly zero in ``weight``;
the fit loop multiplies gradients by the mask, so they stay zero through every optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn


class Maskable(nn.Module):
    """A module whose ``weight`` may carry a frozen sparsity mask (True = alive)."""

    weight: nn.Parameter
    mask: Tensor | None
    # The weight's axis that runs over a product's inputs, along which N:M groups are counted: rows of
    # a d_in x d_out projection; the hidden columns of a table that also serves as the output head.
    input_axis: int = 0

    def set_mask(self, mask: Tensor | None) -> None:
        """Freeze the entries where `mask` is False: they become and stay exactly zero."""
        if mask is None:
            self.mask = None
            return
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        mask = mask.to(device=self.weight.device, dtype=torch.bool)
        self.mask = mask if self.mask is None else (self.mask & mask)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def alive(self) -> int:
        """Stored (non-removed) weight entries."""
        return int(self.mask.sum()) if self.mask is not None else self.weight.numel()

    def dense_weight(self) -> Tensor:
        """The weight as a plain dense matrix in this module's orientation."""
        return self.weight.detach()


class Projection(Maskable):
    """``y = x @ W + b`` with ``W`` stored as ``d_in x d_out``."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("mask", None)

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, bias={self.bias is not None}, alive={self.alive()}"


class FoldedProjection(Projection):
    """Identical Row Compression: the folded rows of ``W`` all equal one shared vector ``q``.

    ``W[i] = q`` for every folded row ``i``; the other ("free") rows are stored as a dense block.
    Then ``x @ W = x[:, free] @ W_free + (sum_i x[:, folded_i]) q^T``; with every row folded this
    is ``s q^T`` where ``s`` is each token's feature sum (Eq. 4-9), and no matrix product remains.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, folded: Tensor, q: Tensor) -> None:
        folded = folded.to(device=weight.device, dtype=torch.bool)
        free_rows = (~folded).nonzero().flatten()
        super().__init__(weight[free_rows], bias)
        self.register_buffer("free_rows", free_rows)
        self.register_buffer("folded_rows", folded.nonzero().flatten())
        self.q = nn.Parameter(q.detach().clone())
        self._d_in = folded.numel()

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_out(self) -> int:
        return self.q.numel()

    def forward(self, x: Tensor) -> Tensor:
        if self.free_rows.numel() == 0:
            y = x.sum(-1, keepdim=True) * self.q
        else:
            y = x.index_select(-1, self.free_rows) @ self.weight
            if self.folded_rows.numel():
                y = y + x.index_select(-1, self.folded_rows).sum(-1, keepdim=True) * self.q
        return y + self.bias if self.bias is not None else y

    @property
    def n_folded(self) -> int:
        return self.folded_rows.numel()

    def fully_folded(self) -> bool:
        return self.free_rows.numel() == 0

    def token_scalar(self, x: Tensor) -> Tensor:
        """Each token's feature sum ``s`` (what the shared row multiplies when every row is folded)."""
        return x.sum(-1)

    def head_vector(self) -> Tensor:
        """The shared row ``q`` (length d_out), split into heads by the attention."""
        return self.q

    def alive(self) -> int:
        return super().alive() + (self.q.numel() if self.folded_rows.numel() else 0)

    def dense_weight(self) -> Tensor:
        w = torch.empty(self._d_in, self.d_out, dtype=self.q.dtype, device=self.q.device)
        w[self.free_rows] = self.weight.detach()
        w[self.folded_rows] = self.q.detach()
        return w


class ColumnFoldedProjection(Projection):
    """IRC, the other reading of the paper: the folded *columns* of ``W`` (output features) all equal
    one shared column ``q`` of length ``d_in``, so every folded output is the same combination
    ``x . q``; with every column folded ``W = q 1^T`` and the projection is one dot product per token,
    broadcast to every output feature. The free columns are stored as a dense block."""

    def __init__(self, weight: Tensor, bias: Tensor | None, folded: Tensor, q: Tensor) -> None:
        folded = folded.to(device=weight.device, dtype=torch.bool)
        free_cols = (~folded).nonzero().flatten()
        super().__init__(weight[:, free_cols], bias)
        self.register_buffer("free_cols", free_cols)
        self.register_buffer("folded_cols", folded.nonzero().flatten())
        self.q = nn.Parameter(q.detach().clone())
        self._d_out = folded.numel()

    @property
    def d_in(self) -> int:
        return self.q.numel()

    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def n_folded(self) -> int:
        return self.folded_cols.numel()

    def fully_folded(self) -> bool:
        return self.free_cols.numel() == 0

    def token_scalar(self, x: Tensor) -> Tensor:
        """Each token's shared output ``x . q`` (the folded outputs' common value, bias excluded)."""
        return x @ self.q.to(x.dtype)

    def head_vector(self) -> Tensor:
        """The output pattern the token scalar multiplies: ones (every folded output is equal)."""
        return torch.ones(self._d_out, dtype=self.q.dtype, device=self.q.device)

    def forward(self, x: Tensor) -> Tensor:
        shared = self.token_scalar(x)[..., None].expand(*x.shape[:-1], self.folded_cols.numel())
        if self.free_cols.numel() == 0:
            y = shared
        else:
            y = x.new_zeros(*x.shape[:-1], self._d_out).index_copy(-1, self.free_cols, x @ self.weight)
            y = y.index_copy(-1, self.folded_cols, shared)
        return y + self.bias if self.bias is not None else y.contiguous()

    def alive(self) -> int:
        return super().alive() + (self.q.numel() if self.folded_cols.numel() else 0)

    def dense_weight(self) -> Tensor:
        w = torch.empty(self.d_in, self._d_out, dtype=self.q.dtype, device=self.q.device)
        w[:, self.free_cols] = self.weight.detach()
        w[:, self.folded_cols] = self.q.detach()[:, None]
        return w


FOLDED = (FoldedProjection, ColumnFoldedProjection)  # the two readings of IRC


class MaskedEmbedding(nn.Embedding, Maskable):
    """An embedding table with an FPP mask. It shares the original ``weight`` Parameter, so a
    tied output head (Llama's ``lm_head``) keeps pointing at the same, pruned, tensor. A table that
    scales its lookups (Gemma's ``embed_scale``, sqrt(hidden)) keeps scaling them."""

    input_axis = 1

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.padding_idx = base.padding_idx
        self.max_norm, self.norm_type = base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight
        self.register_buffer("mask", None)
        scale = getattr(base, "embed_scale", None)
        self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).detach().clone(),
                             persistent=False)
        self._native = [base]  # in a list: the original module, for export, is not a submodule

    def forward(self, ids: Tensor) -> Tensor:
        out = super().forward(ids)
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def plain(self) -> nn.Embedding:
        """The model's own embedding class again, sharing this weight (for export)."""
        emb = self._native[0]
        emb.weight = self.weight
        return emb


class FusedProjections(nn.Module):
    """A native layer that computes several projections at once (GPT-2's ``c_attn``, Phi-3's
    ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's ``query_key_value``) split into one `Projection`
    per role, so each is compressed on its own; their outputs are concatenated back into the
    native layout: one after another, or per head (``heads``: GPT-NeoX's ``[q_h k_h v_h]`` rows)."""

    def __init__(self, parts: dict[str, Projection], heads: int | None = None) -> None:
        super().__init__()
        self.roles = tuple(parts)
        self.heads = heads
        for role, part in parts.items():
            self.add_module(role, part)

    def parts(self) -> list[nn.Module]:
        return [getattr(self, r) for r in self.roles]

    def forward(self, x: Tensor) -> Tensor:
        outs = [p(x) for p in self.parts()]
        if self.heads is None:
            return torch.cat(outs, dim=-1)
        per_head = [o.reshape(*o.shape[:-1], self.heads, -1) for o in outs]
        return torch.cat(per_head, dim=-1).flatten(-2)

    @staticmethod
    def split_rows(t: Tensor, sizes: list[int], heads: int | None) -> list[Tensor]:
        """The native output axis (dim 0) of `t` cut into the parts' rows, in `roles` order."""
        if heads is None:
            return list(t.split(sizes, dim=0))
        per_head = t.reshape(heads, sum(sizes) // heads, *t.shape[1:])
        return [c.reshape(-1, *t.shape[1:]) for c in per_head.split([n // heads for n in sizes], dim=1)]

    @staticmethod
    def join_rows(parts: list[Tensor], heads: int | None) -> Tensor:
        """Inverse of `split_rows`."""
        if heads is None:
            return torch.cat(parts, dim=0)
        return torch.cat([p.reshape(heads, -1, *p.shape[1:]) for p in parts], dim=1).reshape(-1, *parts[0].shape[1:])


def mask_gradients(model: nn.Module) -> None:
    """Zero the gradients of pruned entries, so an optimizer step keeps them exactly zero."""
    for m in model.modules():
        if isinstance(m, Maskable) and m.mask is not None and m.weight.grad is not None:
            m.weight.grad.mul_(m.mask)


def iter_maskable(module: nn.Module):
    """(qualified name, module) of every Maskable below `module`."""
    return ((n, m) for n, m in module.named_modules() if isinstance(m, Maskable))


def report_non_finite(model: nn.Module, where: str) -> int:
    """Count NaN / infinite weights and log a warning naming the first tensor that has them."""
    bad = {name: int((~torch.isfinite(p)).sum()) for name, p in model.named_parameters()
           if p.is_floating_point() and not bool(torch.isfinite(p).all())}
    if bad:
        first = next(iter(bad))
        logging.getLogger(__name__).warning("%s: %d non-finite weight values in %d tensors (first: %s)", where,
                                            sum(bad.values()), len(bad), first)
    return sum(bad.values())


@contextlib.contextmanager
def forward_pre_hooks(hooks: Iterable[tuple[nn.Module, Callable]], *, with_kwargs: bool = False) -> Iterator[None]:
    """Forward pre-hooks on modules for the duration of a ``with`` block, removed however it ends."""
    handles = [m.register_forward_pre_hook(h, with_kwargs=with_kwargs) for m, h in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_in_chunks(fn: Callable[[Tensor], object], x: Tensor, chunk: int = 8) -> None:
    """`fn` on `x` a chunk of windows at a time, without gradients (for what hooks observe)."""
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            fn(x[s:s + chunk])
