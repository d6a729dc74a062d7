"""Inference that uses the structure compression created, instead of multiplying by zeros.

`smartprune.adapters.install.use_structure(model)` swaps, where the structure allows it:

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartprune.modules.masked import FOLDED, Projection

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


@dataclass(frozen=True)
class Rope:
    """A block's rotary tables: RoPE's frequencies (one per rotated pair; fewer than head_dim / 2
    with partial rotary, the remaining dimensions pass unrotated) and its attention scaling."""

    inv_freq: Tensor
    scaling: float = 1.0


@dataclass(frozen=True)
class HeadNorm:
    """An RMS norm applied to each head of a projection's output (Qwen 3's and Gemma 3's q_norm /
    k_norm): ``norm(x) = x * g / sqrt(mean(x^2) + eps)``, ``g`` whatever the module's own weighting is."""

    norm: nn.Module
    eps: float


class IRCAttention(nn.Module):
    """Causal self-attention of a block whose Q and K are fully folded (see the module docstring).

    A per-head RMS norm after the projection (`HeadNorm`) keeps the form: with ``Q_h = s q_h``,
    ``norm(s q_h) = t_h(s) u_h`` where ``u_h = q_h * g`` and ``t_h(s) = s / sqrt(s^2 mean(q_h^2) + eps)``,
    so each head gets its own token scalar, a function of the same ``s`` (``sign(s)`` up to the eps).
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module, *, n_heads: int,
                 n_kv: int, head_dim: int, layer_idx: int, rope: Rope | None, scaling: float | None = None,
                 q_norm: HeadNorm | None = None, k_norm: HeadNorm | None = None, prefill: str = "sdpa") -> None:
        super().__init__()
        if prefill not in ("sdpa", "offset"):
            raise ValueError(f"prefill kernel must be 'sdpa' or 'offset', got {prefill!r}")
        self.prefill = prefill
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.n_heads, self.n_kv, self.head_dim, self.layer_idx = n_heads, n_kv, head_dim, layer_idx
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        self.q_norm, self.k_norm = q_norm, k_norm
        for name, hn in (("q_norm_module", q_norm), ("k_norm_module", k_norm)):
            if hn is not None:  # registered, so the norm's weight moves with the module (.to, .cuda)
                self.add_module(name, hn.norm)
        self.rope = rope  # the tables; the frequencies are a buffer, so they move with the module
        if rope is not None:
            self.register_buffer("inv_freq", rope.inv_freq.detach().float().clone(), persistent=False)
            if 2 * rope.inv_freq.numel() > head_dim:
                raise ValueError(f"{rope.inv_freq.numel()} rotary frequencies for head_dim {head_dim}")
        if rope is not None and (q.bias is not None or k.bias is not None):
            raise ValueError("IRC attention with RoPE supports projections without bias only")

    def _vectors(self) -> tuple[Tensor, Tensor]:
        """Per head, the vectors the token scalars multiply: (heads, head_dim) for Q and for K (K's
        repeated over its query group), after the head norm's weighting where there is one."""
        groups = self.n_heads // self.n_kv
        q = _normed(self.q_proj.head_vector().float().view(self.n_heads, self.head_dim), self.q_norm)
        k = _normed(self.k_proj.head_vector().float().view(self.n_kv, self.head_dim), self.k_norm)
        return q, k.repeat_interleave(groups, 0)

    def head_scalars(self, s: Tensor, side: str) -> Tensor:
        """(b, heads, T): each head's token scalar from the tokens' scalars `s` (b, T)."""
        proj, hn, n = (self.q_proj, self.q_norm, self.n_heads) if side == "q" else (self.k_proj, self.k_norm, self.n_kv)
        if hn is None:
            return s[:, None, :].expand(-1, self.n_heads, -1)
        m = proj.head_vector().float().view(n, self.head_dim).pow(2).mean(-1)  # (n,)
        t = s[:, None, :] * torch.rsqrt(s[:, None, :] ** 2 * m[None, :, None] + hn.eps)
        return t.repeat_interleave(self.n_heads // n, 1)

    def _pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """RoPE's per-pair products of the head vectors: A, B (heads, pairs) and the unrotated part's
        dot product c (heads,)."""
        q, k = self._vectors()
        half = self.inv_freq.numel()
        q1, q2, k1, k2 = q[:, :half], q[:, half:2 * half], k[:, :half], k[:, half:2 * half]
        c = (q[:, 2 * half:] * k[:, 2 * half:]).sum(-1)
        return q1 * k1 + q2 * k2, q2 * k1 - q1 * k2, c

    def _offset_table(self, n: int) -> Tensor:
        """(n, heads): f(D) for offsets D = 0..n-1 (query later than key by D)."""
        a, b, c = self._pairs()
        angles = torch.arange(n, dtype=torch.float32, device=a.device)[:, None] * self.inv_freq[None, :]
        return self.rope.scaling ** 2 * (torch.cos(angles) @ a.t() - torch.sin(angles) @ b.t()) + c[None, :]

    def scores(self, s_q: Tensor, p_q: Tensor, s_k: Tensor, p_k: Tensor) -> Tensor:
        """(batch, heads, Tq, Tk) pre-softmax scores from feature sums and positions (future keys are
        not masked here)."""
        tq, tk = self.head_scalars(s_q, "q"), self.head_scalars(s_k, "k")
        outer = (tq * self.scaling)[..., :, None] * tk[..., None, :]  # (b, heads, Tq, Tk)
        if self.rope is None:
            q, k = self._vectors()
            c = (q * k).sum(-1)  # (heads,)
            if self.q_proj.bias is None:
                return outer * c[None, :, None, None]
            e = (self.q_proj.bias.float().view_as(q) * k).sum(-1) * self.scaling
            return outer * c[None, :, None, None] + e[None, :, None, None] * tk[..., None, :]
        offsets = (p_q[:, :, None] - p_k[:, None, :]).clamp_min(0)  # (b, Tq, Tk); negative ones are masked
        table = self._offset_table(int(offsets.max()) + 1).t().contiguous()  # (heads, n)
        return table[:, offsets].transpose(0, 1) * outer  # gathered per head: (b, heads, Tq, Tk)

    def rank_vectors(self, s_q: Tensor, p_q: Tensor, s_k: Tensor, p_k: Tensor) -> tuple[Tensor, Tensor]:
        """(q~, k~) of shape (b, heads, T, E) with q~_i . k~_j equal to the scores before scaling, built
        element-wise from the scalars and the rotation tables: E = 1 without RoPE (the scores have
        rank one), E = 2 * pairs (+ 1 with partial rotary) with it."""
        tq, tk = self.head_scalars(s_q, "q"), self.head_scalars(s_k, "k")
        if self.rope is None:
            q, k = self._vectors()
            c = (q * k).sum(-1)
            e = torch.zeros_like(c) if self.q_proj.bias is None else (self.q_proj.bias.float().view_as(q) * k).sum(-1)
            return (tq * c[None, :, None] + e[None, :, None])[..., None], tk[..., None]
        a, b, c = self._pairs()
        inv = self.inv_freq
        cq, sq = torch.cos(p_q[..., None] * inv)[:, None], torch.sin(p_q[..., None] * inv)[:, None]  # (b, 1, Tq, pairs)
        ck, sk = torch.cos(p_k[..., None] * inv)[:, None], torch.sin(p_k[..., None] * inv)[:, None]
        sw = (self.rope.scaling ** 2 * tk)[..., None]
        a, b = a[None, :, None, :], b[None, :, None, :]
        qt = [tq[..., None] * cq, tq[..., None] * sq]
        kt = [sw * (a * ck + b * sk), sw * (a * sk - b * ck)]  # (b, heads, Tk, pairs) each
        if 2 * inv.numel() < self.head_dim:  # partial rotary: the unrotated dimensions add s_i s_j c
            qt.append(tq[..., None])
            kt.append(tk[..., None] * c[None, :, None, None])
        return torch.cat(qt, -1), torch.cat(kt, -1)

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


def _normed(vectors: Tensor, hn: HeadNorm | None) -> Tensor:
    """``u_h = q_h * g``: the norm's weighting of each head vector without its 1/rms (the rms goes into
    the token scalar), from the module itself: ``norm(q_h) * sqrt(mean(q_h^2) + eps)``."""
    if hn is None:
        return vectors
    rms = (vectors.pow(2).mean(-1, keepdim=True) + hn.eps).sqrt()
    return hn.norm(vectors.to(_param_dtype(hn.norm))).float() * rms


def _param_dtype(m: nn.Module) -> torch.dtype:
    return next((p.dtype for p in m.parameters()), torch.float32)


STRUCTURED_MODULES = (IRCAttention, DiagonalProjection, SparseProjection)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Plain softmax attention (b, heads, T, d) for tests: causal when `mask` is None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
