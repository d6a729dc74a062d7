"""Inference that uses the structure compression created, instead of multiplying by zeros.

`use_structure(model)` swaps, where the structure allows it:

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
- **DWC values**: a V whose mask keeps one input per output (the (generalized) diagonal) becomes an
  element-wise product ``x[:, idx] * w``.
- **Sparse feed-forward**: a masked matrix at or above the CSR crossover sparsity runs through a
  CSR kernel; below it the dense kernel is faster on this CPU and is kept (see
  `benchmarks/sparse_crossover.py` and docs/compact-results.md for the measured crossover).

Each swap is exact up to float rounding (tests compare against the dense materialization).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartprune.adapters import get_adapter
from smartprune.nn import FoldedProjection, Projection

log = logging.getLogger(__name__)

# Measured on the development machine (2-core AMD EPYC, torch 2.13 CPU): CSR matmul beats dense
# from about this sparsity on SmolLM2's feed-forward shapes at 128-1024 tokens.
CSR_MIN_SPARSITY = 0.95


def fully_folded(p: nn.Module) -> bool:
    return isinstance(p, FoldedProjection) and p.free_rows.numel() == 0


class IRCAttention(nn.Module):
    """Causal self-attention of a block whose Q and K are fully folded (see the module docstring)."""

    def __init__(self, q: FoldedProjection, k: FoldedProjection, v: nn.Module, o: nn.Module, *, n_heads: int,
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
        q = self.q_proj.q.view(self.n_heads, self.head_dim)
        k = self.k_proj.q.view(self.n_kv, self.head_dim).repeat_interleave(groups, 0)
        return q, k

    def _offset_table(self, n: int) -> Tensor:
        """(n, heads): f(D) for offsets D = 0..n-1 (query later than key by D)."""
        q, k = self._vectors()
        half = self.head_dim // 2
        q1, q2, k1, k2 = q[:, :half], q[:, half:], k[:, :half], k[:, half:]
        a, b = q1 * k1 + q2 * k2, q2 * k1 - q1 * k2  # (heads, half)
        angles = torch.arange(n, dtype=torch.float32)[:, None] * self.rope.inv_freq.float()[None, :]
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
            e = (self.q_proj.bias.view_as(q) * k).sum(-1) * self.scaling
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
            e = torch.zeros_like(c) if self.q_proj.bias is None else (self.q_proj.bias.view_as(q) * k).sum(-1)
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
                past_key_values=None, position_ids: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
        x = hidden_states
        b, t, _ = x.shape
        s = x.sum(-1)
        past = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
        pos = position_ids.expand(b, t) if position_ids is not None else \
            torch.arange(past, past + t, device=x.device).expand(b, t)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        keys = torch.stack([s, pos.to(s.dtype)], -1).unsqueeze(1)  # (b, 1, t, 2): the cache's "key" per token
        if past_key_values is not None:
            keys, v = past_key_values.update(keys, v, self.layer_idx)
        s_k, p_k = keys[:, 0, :, 0], keys[:, 0, :, 1].round().long()
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if t == 1 or self.prefill == "offset":  # decoding: a (heads, Tk) gather, no product at all
            scores = _apply_mask(self.scores(s, pos.long(), s_k, p_k), attention_mask, pos.long(), p_k)
            out = torch.softmax(scores, dim=-1) @ v
        else:  # prefill: the fused kernel on the rank-structured vectors (faster on CPU, measured)
            qt, kt = self.rank_vectors(s, pos.float(), s_k, p_k.float())
            causal = attention_mask is None and s_k.shape[1] == t
            mask = attention_mask[..., : s_k.shape[1]] if attention_mask is not None else None
            if attention_mask is None and not causal:
                mask = (pos[:, :, None] >= p_k[:, None, :]).unsqueeze(1)
            out = F.scaled_dot_product_attention(qt.contiguous(), kt.contiguous(), v, attn_mask=mask,
                                                 is_causal=causal, scale=self.scaling)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out), None


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
    parameter, so training works as before and is what `state_dict` holds)."""

    def __init__(self, p: Projection) -> None:
        super().__init__(p.weight.detach(), p.bias)
        self.set_mask(p.mask)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernel is what we measured
            warnings.simplefilter("ignore", UserWarning)
            self._csr = self.weight.detach().t().contiguous().to_sparse_csr()  # (d_out, d_in)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled():
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        y = (self._csr @ flat.t()).t().reshape(*x.shape[:-1], self.d_out)
        return y + self.bias if self.bias is not None else y


STRUCTURED_MODULES = (IRCAttention, DiagonalProjection, SparseProjection)


def use_structure(model: nn.Module, *, csr_min_sparsity: float = CSR_MIN_SPARSITY) -> dict[str, int]:
    """Swap in the structured modules wherever they apply; returns how many of each were installed."""
    adapter = get_adapter(model)
    counts: Counter[str] = Counter()
    for i in range(len(adapter.blocks())):
        paths = adapter.attention_paths(i)
        v = model.get_submodule(paths["v"])
        if isinstance(v, Projection) and not isinstance(v, FoldedProjection):
            diag = DiagonalProjection.of(v)
            if diag is not None:
                adapter.replace(paths["v"], diag)
                counts["diagonal_v"] += 1
        attn = adapter.structured_attention(i)
        if attn is not None:
            adapter.replace(adapter.attention_module_path(i), attn)
            counts["irc_attention"] += 1
        for path in adapter.ff_paths(i).values():
            p = model.get_submodule(path)
            if type(p) is Projection and p.mask is not None and 1 - p.alive() / p.weight.numel() >= csr_min_sparsity:
                adapter.replace(path, SparseProjection(p))
                counts["csr_ff"] += 1
    log.info("structured inference: %s", dict(counts) or "nothing applies")
    return dict(counts)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Plain softmax attention (b, heads, T, d) for tests: causal when `mask` is None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
