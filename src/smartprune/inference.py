"""Inference that uses the structure compression created, instead of multiplying by zeros.

`smartprune.structure.use_structure(model)` swaps, where the structure allows it:

- **IRC attention**: with every row of ``W_Q`` and ``W_K`` folded, ``Q_i = s_i q`` and ``K_j = s_j k``
  (``s`` the token's feature sum, ``q``/``k`` the shared rows split into heads). Then no Q/K projection
  and no ``Q K^T`` product is needed: per head ``score_ij = s_i s_j c`` without RoPE, and with RoPE
  ``score_ij = s_i s_j f(p_i - p_j)``, where the *offset function*
  ``f(D) = sum_m A_m cos(D theta_m) - B_m sin(D theta_m)``, ``A = q1 k1 + q2 k2``, ``B = q2 k1 - q1 k2``
  over RoPE's rotation pairs, is tabulated once per call over the offsets and gathered. A query/key
  bias (GPT-2's ``c_attn``) adds ``s_j (b_q . k)``; terms constant along keys cancel in the softmax.
  The KV cache keeps ``(s_j, p_j)`` instead of a key vector. Decoding (one query) gathers its scores
  from the offset table: no product at all. For a prefill of many tokens the element-wise T x T
  work (gather, softmax over the full square) measured slower on this CPU than the fused causal
  SDPA kernel (0.58x at 512 tokens, 0.25x at 1024), so by default the same scores are handed to
  SDPA as rank-structured vectors built element-wise from ``s`` and the rotation tables (rank 1
  without RoPE; ``q~`` shared by all heads with it); ``prefill="offset"`` keeps the pure path.
  The other reading of IRC (columns folded, ``W = q 1^T``) has the same form with ``s_i = x_i . q``
  per projection and a vector of ones per head, so the same module runs it. The cache keeps ``s`` and
  the position (as base-256 digits, exact in any dtype) in the values' dtype; the cache reaches the
  module under whatever keyword the installed transformers uses (`_take_cache`).
- Every module computes in its input's dtype (float32, bfloat16, float16); the scores are built in
  float32 and cast, as the dense attention's softmax is.
- **DWC values**: a V whose mask keeps one input per output (the (generalized) diagonal) becomes an
  element-wise product ``x[:, idx] * w``.
- **Sparse feed-forward**: a masked matrix at or above the CSR crossover sparsity runs through a
  CSR kernel; below it the dense kernel is faster on this CPU and is kept (see
  `benchmarks/sparse_crossover.py` and docs/compact-results.md for the measured crossover).

Each swap is exact up to float rounding (tests compare against the dense materialization).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartprune.nn import FOLDED, Projection

# Transformers has passed the per-layer KV cache under several keyword names across 5.x releases
# (`past_key_values` up to 5.23, `cache` from 5.24, `past_key_value` in some 4.x models). The IRC
# attention accepts any of them; see `_take_cache`.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class CacheNotPassedError(RuntimeError):
    """The model asked for a KV cache (`use_cache=True`) but handed the attention module none under
    any name it knows: this transformers version calls attention in a way smartprune does not
    support, and decoding would silently attend to the current token only."""


def _take_cache(kwargs: dict):
    """The cache object among `kwargs` (removed from them), whatever keyword transformers used; raises
    `CacheNotPassedError` when a cache was requested but none is recognisable."""
    from transformers.cache_utils import Cache

    found = None
    for name in CACHE_KWARGS:
        value = kwargs.pop(name, None)
        if value is not None and found is None:
            found = value
    if found is None:  # a future keyword name: any Cache instance will do
        for name, value in list(kwargs.items()):
            if isinstance(value, Cache):
                found = kwargs.pop(name)
                break
    if found is None and kwargs.get("use_cache"):
        import transformers

        raise CacheNotPassedError(
            f"IRC attention: transformers {transformers.__version__} asked for a KV cache but passed none under "
            f"{', '.join(CACHE_KWARGS)} or as a Cache instance; structured inference does not support this "
            "version (load with structured=False)")
    return found


# Measured on the development machine (2-core AMD EPYC, torch 2.13 CPU): CSR matmul beats dense
# from about this sparsity on SmolLM2's feed-forward shapes at 128-1024 tokens.
CSR_MIN_SPARSITY = 0.95


def fully_folded(p: nn.Module) -> bool:
    """Every row (or, in the other reading, every column) of the projection is the shared vector."""
    return isinstance(p, FOLDED) and p.fully_folded()


class IRCAttention(nn.Module):
    """Causal self-attention of a block whose Q and K are fully folded (see the module docstring)."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module, *, n_heads: int,
                 n_kv: int, head_dim: int, layer_idx: int, rope: nn.Module | None, prefill: str = "sdpa") -> None:
        super().__init__()
        if prefill not in ("sdpa", "offset"):
            raise ValueError(f"prefill kernel must be 'sdpa' or 'offset', got {prefill!r}")
        self.prefill = prefill
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.n_heads, self.n_kv, self.head_dim, self.layer_idx = n_heads, n_kv, head_dim, layer_idx
        self.scaling = head_dim ** -0.5
        self.rope = rope  # the model's rotary module (inv_freq, attention_scaling) or None
        if rope is not None and (q.bias is not None or k.bias is not None):
            raise ValueError("IRC attention with RoPE supports projections without bias only")

    def _vectors(self) -> tuple[Tensor, Tensor]:
        groups = self.n_heads // self.n_kv
        q = self.q_proj.head_vector().float().view(self.n_heads, self.head_dim)
        k = self.k_proj.head_vector().float().view(self.n_kv, self.head_dim).repeat_interleave(groups, 0)
        return q, k

    def _offset_table(self, n: int) -> Tensor:
        """(n, heads): f(D) for offsets D = 0..n-1 (query later than key by D)."""
        q, k = self._vectors()
        half = self.head_dim // 2
        q1, q2, k1, k2 = q[:, :half], q[:, half:], k[:, :half], k[:, half:]
        a, b = q1 * k1 + q2 * k2, q2 * k1 - q1 * k2  # (heads, half)
        angles = torch.arange(n, dtype=torch.float32, device=q.device)[:, None] * self.rope.inv_freq.float()[None, :]
        scale = float(getattr(self.rope, "attention_scaling", 1.0)) ** 2
        return scale * (torch.cos(angles) @ a.t() - torch.sin(angles) @ b.t())

    def scores(self, s_q: Tensor, p_q: Tensor, s_k: Tensor, p_k: Tensor) -> Tensor:
        """(batch, heads, Tq, Tk) pre-softmax scores from feature sums and positions (future keys are
        not masked here)."""
        outer = (s_q * self.scaling)[:, None, :, None] * s_k[:, None, None, :]  # (b, 1, Tq, Tk)
        if self.rope is None:
            q, k = self._vectors()
            c = (q * k).sum(-1)  # (heads,)
            if self.q_proj.bias is None:
                return outer * c[None, :, None, None]
            e = (self.q_proj.bias.float().view_as(q) * k).sum(-1) * self.scaling
            return outer * c[None, :, None, None] + e[None, :, None, None] * s_k[:, None, None, :]
        offsets = (p_q[:, :, None] - p_k[:, None, :]).clamp_min(0)  # (b, Tq, Tk); negative ones are masked
        table = self._offset_table(int(offsets.max()) + 1).t().contiguous()  # (heads, n)
        return table[:, offsets].transpose(0, 1) * outer  # gathered per head: (b, heads, Tq, Tk)

    def rank_vectors(self, s_q: Tensor, p_q: Tensor, s_k: Tensor, p_k: Tensor) -> tuple[Tensor, Tensor]:
        """(q~, k~) of shape (b, heads, T, E) with q~_i . k~_j equal to the scores before scaling, built
        element-wise from the sums and the rotation tables: E = 1 without RoPE (the scores have rank
        one), E = head_dim with it (q~ is the same for every head)."""
        q, k = self._vectors()
        if self.rope is None:
            c = (q * k).sum(-1)
            e = torch.zeros_like(c) if self.q_proj.bias is None else (self.q_proj.bias.float().view_as(q) * k).sum(-1)
            qt = s_q[:, None, :, None] * c[None, :, None, None] + e[None, :, None, None]
            return qt, s_k[:, None, :, None].expand(-1, self.n_heads, -1, -1)
        half = self.head_dim // 2
        q1, q2, k1, k2 = q[:, :half], q[:, half:], k[:, :half], k[:, half:]
        a, b = q1 * k1 + q2 * k2, q2 * k1 - q1 * k2  # (heads, half)
        inv = self.rope.inv_freq.float()
        cq, sq = torch.cos(p_q[..., None] * inv), torch.sin(p_q[..., None] * inv)  # (b, Tq, half)
        ck, sk = torch.cos(p_k[..., None] * inv), torch.sin(p_k[..., None] * inv)
        scale = float(getattr(self.rope, "attention_scaling", 1.0)) ** 2
        qt = (s_q[..., None] * torch.cat([cq, sq], -1))[:, None].expand(-1, self.n_heads, -1, -1)
        ck, sk, sw = ck[:, None], sk[:, None], (scale * s_k)[:, None, :, None]
        a, b = a[None, :, None, :], b[None, :, None, :]
        kt = sw * torch.cat([a * ck + b * sk, a * sk - b * ck], -1)  # (b, heads, Tk, head_dim)
        return qt, kt

    def forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
        cache = _take_cache(kwargs)
        x = hidden_states
        b, t, _ = x.shape
        # Each token's scalar (its feature sum; x . q in the column reading) for the query and the key
        # side, in float32: the scores are built from them and the positions element-wise.
        s_q, s = self.q_proj.token_scalar(x.float()), self.k_proj.token_scalar(x.float())
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        pos = position_ids.expand(b, t) if position_ids is not None else \
            torch.arange(past, past + t, device=x.device).expand(b, t)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:  # the cache's "key" per token: its sum and its position, in the values' dtype
            keys, v = cache.update(encode_keys(s, pos, v.dtype), v, self.layer_idx)
            s_k, p_k = decode_keys(keys)
        else:
            s_k, p_k = s, pos.long()
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if t == 1 or self.prefill == "offset":  # decoding: a (heads, Tk) gather, no product at all
            scores = _apply_mask(self.scores(s_q, pos.long(), s_k, p_k), attention_mask, pos.long(), p_k)
            out = torch.softmax(scores, dim=-1).to(v.dtype) @ v
        else:  # prefill: the fused kernel on the rank-structured vectors (faster on CPU, measured)
            qt, kt = self.rank_vectors(s_q, pos.float(), s_k, p_k.float())
            causal = attention_mask is None and s_k.shape[1] == t
            mask = attention_mask[..., : s_k.shape[1]] if attention_mask is not None else None
            if attention_mask is None and not causal:
                mask = (pos[:, :, None] >= p_k[:, None, :]).unsqueeze(1)
            if mask is not None and mask.is_floating_point():
                mask = mask.to(v.dtype)
            out = F.scaled_dot_product_attention(qt.to(v.dtype).contiguous(), kt.to(v.dtype).contiguous(), v,
                                                 attn_mask=mask, is_causal=causal, scale=self.scaling)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out), None


# A cached position is stored as base-256 digits: a cache keeps one dtype per tensor, and bfloat16
# holds integers exactly only up to 256 (float16 up to 2048); three digits cover 16.7M positions.
_DIGITS = 3


def encode_keys(s: Tensor, pos: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, 1, t, 1 + digits): each token's feature sum and its position's base-256 digits, in `dtype`."""
    digits = [(pos // 256 ** i) % 256 for i in range(_DIGITS)]
    return torch.stack([s, *(d.float() for d in digits)], -1).unsqueeze(1).to(dtype)


def decode_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(sums in float32, positions as long) from `encode_keys`' layout."""
    k = keys[:, 0].float()
    pos = sum(k[..., 1 + i].round().long() * 256 ** i for i in range(_DIGITS))
    return k[..., 0], pos


def _apply_mask(scores: Tensor, mask: Tensor | None, p_q: Tensor, p_k: Tensor) -> Tensor:
    """Causal by positions when no mask is given; else the model's 4-D mask (bool: True attends;
    float: added)."""
    if mask is None:
        allowed = (p_q[:, :, None] >= p_k[:, None, :]).unsqueeze(1)
        return scores.masked_fill(~allowed, float("-inf"))
    mask = mask[..., : scores.shape[-1]]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


class DiagonalProjection(nn.Module):
    """``y[:, c] = x[:, idx_c] * w_c + b_c``: a matrix with one stored entry per output column."""

    def __init__(self, idx: Tensor, w: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("idx", idx)
        self.weight = nn.Parameter(w.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def of(cls, p: Projection) -> DiagonalProjection | None:
        """The diagonal form of `p`, or None when a column keeps more or fewer than one entry."""
        if p.mask is None or not bool((p.mask.sum(0) == 1).all()):
            return None
        idx = p.mask.float().argmax(0)
        return cls(idx, p.weight.detach()[idx, torch.arange(p.d_out)], p.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = x.index_select(-1, self.idx) * self.weight
        return y + self.bias if self.bias is not None else y


class SparseProjection(Projection):
    """A masked projection run through a CSR kernel in inference (the dense masked weight stays the
    parameter, so training works as before and is what `state_dict` holds).

    The CSR copy is made per (dtype, device) on first use, so ``model.to(torch.bfloat16)`` or
    ``.cuda()`` just works. Where torch has no CSR kernel for the dtype (CPU half precision in torch
    2.13: "addmm_out_sparse_csr_impl_mkl not implemented for BFloat16") the dense masked product in
    that dtype is used instead: same result, no speed-up.
    """

    def __init__(self, p: Projection) -> None:
        super().__init__(p.weight.detach(), p.bias)
        self.set_mask(p.mask)
        self._csr: dict[tuple, Tensor | None] = {}

    def _kernel(self, x: Tensor) -> Tensor | None:
        key = (x.dtype, x.device, self.weight._version)
        if key not in self._csr:
            self._csr.clear()
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernel is what we measured
                warnings.simplefilter("ignore", UserWarning)
                csr = self.weight.detach().to(x.dtype).t().contiguous().to_sparse_csr()  # (d_out, d_in)
                try:
                    csr @ x.new_zeros(self.d_in, 1)
                except (NotImplementedError, RuntimeError):
                    csr = None
            self._csr[key] = csr
        return self._csr[key]

    def forward(self, x: Tensor) -> Tensor:
        csr = None if self.training or torch.is_grad_enabled() else self._kernel(x)
        if csr is None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        y = (csr @ flat.t()).t().reshape(*x.shape[:-1], self.d_out)
        return y + self.bias if self.bias is not None else y


STRUCTURED_MODULES = (IRCAttention, DiagonalProjection, SparseProjection)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Plain softmax attention (b, heads, T, d) for tests: causal when `mask` is None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
