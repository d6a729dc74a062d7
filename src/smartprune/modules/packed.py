"""Compressed weights kept in memory as the file keeps them (``smartprune.load(DIR, resident="compact")``).

A pruned matrix stays its surviving values (in the stored dtype: float32, float16, bfloat16, or int8
with one scale per output channel) plus its mask packed 8 entries to a byte, or CSR positions. It is
unpacked only for the product that needs it, one matrix at a time, into the input's dtype, and freed
right after; a tied output head is unpacked a slab of rows at a time, so the full-size table never
exists at once. That trades time for memory: every forward pays the unpacking (measured in
docs/compact-results.md), which is why ``resident="dense"`` (unpacked once at load) stays available.

These modules know nothing of model families: `smartprune.storage.format` decides where they go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smartprune.modules.kernels import MAX_TOKENS, dense_product, packed_product, rows_product

KERNEL_VALUES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # what the kernel reads
# np.packbits order: the first entry of a byte is its highest bit
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)
HEAD_SLAB_ROWS = 4096  # rows of a tied head unpacked at once (4096 x 576 fp32: 9.4 MB for SmolLM2)


@dataclass(frozen=True)
class Quant:
    """Symmetric 8-bit values: ``w = q * scale[channel]``, one scale per entry along `axis` (0: rows)."""

    axis: int


def unpack_bits(packed: Tensor, start: int, count: int) -> Tensor:
    """Entries ``start .. start+count`` of a packed boolean mask."""
    first, last = start // 8, (start + count + 7) // 8
    bits = (packed[first:last].unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.view(-1)[start % 8:start % 8 + count].bool()


def _popcount(b: Tensor) -> Tensor:
    """Set bits of each byte, in uint8 arithmetic (no wider copy of the mask)."""
    b = b - ((b >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return (b + (b >> 4)) & 0x0F


def _row_counts(bits: Tensor, rows: int, cols: int) -> Tensor:
    """Stored values per row of a packed mask, a slab of rows at a time. Byte-aligned rows are
    counted byte by byte: unpacking them would make short-lived buffers 8x the mask's size, which the
    C allocator keeps (measured: ~70 MB of a 3.5 MB mask stayed resident after loading)."""
    slabs = []
    for r in range(0, rows, HEAD_SLAB_ROWS):
        n = min(rows, r + HEAD_SLAB_ROWS) - r
        if cols % 8 == 0:
            slabs.append(_popcount(bits[r * cols // 8:(r + n) * cols // 8]).view(n, cols // 8).sum(1))
        else:
            slabs.append(unpack_bits(bits, r * cols, n * cols).view(n, cols).sum(1))
    return torch.cat(slabs)


class PackedMatrix(nn.Module):
    """A (rows, cols) matrix as its stored pieces: ``values`` (row-major surviving entries, or every
    entry when there is no mask), the mask (``bits``) or CSR (``indptr``, ``indices``), and for 8-bit
    values the per-channel ``scale``. ``row_ptr[r]`` is the position of row r's first value."""

    def __init__(self, shape: tuple[int, int], values: Tensor, *, bits: Tensor | None = None,
                 indptr: Tensor | None = None, indices: Tensor | None = None,
                 scale: Tensor | None = None, quant: Quant | None = None) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.quant = quant
        self.register_buffer("values", values)
        self.register_buffer("bits", bits)
        self.register_buffer("indices", indices)
        self.register_buffer("scale", scale)
        rows, cols = self.shape
        if indptr is not None:
            row_ptr = indptr.long()
        elif bits is not None:
            counts = _row_counts(bits, rows, cols)
            row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        else:
            row_ptr = torch.arange(rows + 1) * cols
        self.register_buffer("row_ptr", row_ptr)
        if int(row_ptr[-1]) != values.numel():
            raise ValueError(f"{values.numel()} stored values for a mask that keeps {int(row_ptr[-1])}")

    def sparsity(self) -> float:
        return 1 - self.values.numel() / (self.shape[0] * self.shape[1])

    def rows(self, start: int, end: int, dtype: torch.dtype) -> Tensor:
        """Rows ``start .. end`` as a dense (end - start, cols) matrix in `dtype`."""
        cols = self.shape[1]
        if self.bits is None and self.indices is None:  # every entry stored: a view, copied only to convert
            out = self.values.view(self.shape)[start:end]
            return out.to(dtype) if self.quant is None else self._scaled(out.to(dtype, copy=True), start, end)
        if self.bits is not None and (start * cols) % 8 == 0:  # the fast path: one masked scatter
            values = self.values[int(self.row_ptr[start]):int(self.row_ptr[end])].to(dtype)
            mask = unpack_bits(self.bits, start * cols, (end - start) * cols)
            out = torch.zeros((end - start) * cols, dtype=dtype, device=values.device)
            return self._scaled(out.masked_scatter_(mask, values).view(end - start, cols), start, end)
        return self.gather_rows(torch.arange(start, end, device=self.values.device), dtype)

    def dense(self, dtype: torch.dtype) -> Tensor:
        return self.rows(0, self.shape[0], dtype)

    def gather_rows(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows `idx` (any shape) as dense vectors (*idx.shape, cols), unpacking only those rows."""
        flat_idx = idx.reshape(-1).long()
        cols, n = self.shape[1], flat_idx.numel()
        first = self.row_ptr[flat_idx]
        ar = torch.arange(cols, device=flat_idx.device)
        if self.bits is None and self.indices is None:  # every entry stored
            out = self.values[first[:, None] + ar].to(dtype)
        elif self.bits is not None:
            pos = flat_idx[:, None] * cols + ar
            mask = ((self.bits[pos // 8] >> (7 - pos % 8).to(torch.uint8)) & 1).bool()
            at = (first[:, None] + mask.long().cumsum(1) - 1).clamp(0, max(self.values.numel() - 1, 0))
            out = self.values[at].to(dtype).masked_fill_(~mask, 0)
        else:  # CSR: scatter each row's stored values into its columns
            counts = self.row_ptr[flat_idx + 1] - first
            which = torch.repeat_interleave(torch.arange(n, device=flat_idx.device), counts)
            at = torch.repeat_interleave(first - (counts.cumsum(0) - counts), counts) + \
                torch.arange(int(counts.sum()), device=flat_idx.device)
            out = torch.zeros(n, cols, dtype=dtype, device=flat_idx.device)
            out[which, self.indices[at].long()] = self.values[at].to(dtype)
        scale = None if self.quant is None else (self.scale[flat_idx][:, None] if self.quant.axis == 0
                                                 else self.scale[None, :])
        out = out if scale is None else out * scale.to(dtype)
        return out.view(*idx.shape, cols)

    def _scaled(self, out: Tensor, start: int, end: int) -> Tensor:
        """8-bit values times their channel's scale (axis 0: one per row, 1: one per column)."""
        if self.quant is None:
            return out
        scale = self.scale[start:end, None] if self.quant.axis == 0 else self.scale[None, :]
        return out.mul_(scale.to(out.dtype))

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


def _kernel_reads(p: PackedMatrix, x: Tensor, tokens: int) -> bool:
    """Whether the compiled kernel can read `p` straight for a product with `x`: a bitmask or every entry
    stored (not CSR), a value dtype it reads, whole mask bytes per row, and a few float32 tokens on the CPU."""
    return (p.bits is not None or p.indices is None) and p.values.dtype in KERNEL_VALUES and p.shape[1] % 8 == 0 \
        and tokens <= MAX_TOKENS and x.dtype == torch.float32 and x.device.type == "cpu"


class PackedProjection(nn.Module):
    """``y = x @ W + b`` with ``W`` (d_in x d_out) a `PackedMatrix`, unpacked for each product."""

    def __init__(self, weight: PackedMatrix, bias: Tensor | None) -> None:
        super().__init__()
        self.packed = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().float())

    @property
    def d_in(self) -> int:
        return self.packed.shape[0]

    @property
    def d_out(self) -> int:
        return self.packed.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        y = self._few_tokens(x)
        if y is None:
            y = x @ self.packed.dense(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def _few_tokens(self, x: Tensor) -> Tensor | None:
        """Decoding's product read straight from the packed form by the compiled kernel (`kernels`),
        or None where it does not apply (many tokens, CSR storage, not float32 on the CPU)."""
        p = self.packed
        tokens = x.numel() // max(x.shape[-1], 1)
        if not _kernel_reads(p, x, tokens):
            return None
        every = p.bits is None  # every entry stored (a dense matrix in narrower values)
        op = dense_product() if every else packed_product()
        if op is None:
            return None
        a = x.reshape(tokens, p.shape[0])
        if p.quant is not None and p.quant.axis == 0:  # one scale per input row: scale the coefficients
            a = a * p.scale.to(a.dtype)
        y = op(a.contiguous(), p.values, p.shape[1]) if every else \
            op(a.contiguous(), p.bits, p.values, p.row_ptr, p.shape[1])
        if p.quant is not None and p.quant.axis == 1:  # one scale per output column
            y = y * p.scale.to(y.dtype)
        return y.view(*x.shape[:-1], p.shape[1])

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, stored={self.packed.values.numel()}"


class PackedEmbedding(nn.Module):
    """Embedding lookups from a `PackedMatrix` table (vocab, hidden): only the looked-up rows are
    unpacked. A table that scales its lookups (Gemma's ``embed_scale``) keeps scaling them."""

    def __init__(self, table: PackedMatrix, embed_scale: Tensor | None = None) -> None:
        super().__init__()
        self.packed = table
        self.num_embeddings, self.embedding_dim = table.shape
        self.register_buffer("embed_scale", embed_scale, persistent=False)
        # The lookups' dtype is the model's (float32; bfloat16 after model.to(torch.bfloat16)), not the
        # stored values': a zero-size buffer follows the model's casts and says which it is.
        self.register_buffer("compute", torch.zeros(0), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        out = self.packed.gather_rows(ids, self.compute.dtype)
        return out * self.embed_scale.to(out.dtype) if self.embed_scale is not None else out


class PackedLinear(nn.Module):
    """``nn.Linear``'s ``y = x @ E^T + b`` over a `PackedMatrix` E (out_features, in_features): an output
    head, perhaps sharing E with the tied input embedding. Decoding (a few tokens) reads E straight from
    its stored form (the compiled kernel); longer inputs unpack it `HEAD_SLAB_ROWS` rows at a time, so a
    49,152-row head never exists whole."""

    def __init__(self, table: PackedMatrix, bias: Tensor | None = None) -> None:
        super().__init__()
        self.packed = table
        self.out_features, self.in_features = table.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().float())

    def forward(self, h: Tensor) -> Tensor:
        rows, flat = self.out_features, h.reshape(-1, h.shape[-1])
        out = self._few_tokens(flat)
        if out is not None:
            out = out.view(*h.shape[:-1], rows)
            return out + self.bias.to(h.dtype) if self.bias is not None else out
        # Each slab's product is written straight into its rows of the transposed output (contiguous
        # there), so no slab-sized product is allocated beside the logits.
        out_t = h.new_empty(rows, flat.shape[0])
        for r in range(0, rows, HEAD_SLAB_ROWS):
            end = min(rows, r + HEAD_SLAB_ROWS)
            torch.mm(self.packed.rows(r, end, h.dtype), flat.t(), out=out_t[r:end])
        out = out_t.t().view(*h.shape[:-1], rows)
        return out + self.bias.to(h.dtype) if self.bias is not None else out

    def _few_tokens(self, flat: Tensor) -> Tensor | None:
        """Decoding's logits read straight from the stored table, row by row, by the compiled kernel
        (`kernels.rows_product`): no slab is unpacked. None where it does not apply (many tokens, CSR
        storage, not float32 on the CPU)."""
        p = self.packed
        if not _kernel_reads(p, flat, flat.shape[0]):
            return None
        op = rows_product()
        if op is None:
            return None
        a = flat
        if p.quant is not None and p.quant.axis == 1:  # one scale per input column: scale the hidden state
            a = a * p.scale.to(a.dtype)
        bits = p.bits if p.bits is not None else torch.empty(0, dtype=torch.uint8)
        y = op(a.contiguous(), bits, p.values, p.row_ptr, p.shape[1])
        if p.quant is not None and p.quant.axis == 0:  # one scale per output row
            y = y * p.scale.to(y.dtype)
        return y


def _storages(t: Tensor) -> list[Tensor]:
    """The tensors that hold `t`'s memory: itself, or for a wrapper subclass without storage of its own
    (torch's semi-structured sparse tensors) its inner tensors (packed values, metadata)."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names if getattr(t, n, None) is not None for x in _storages(getattr(t, n))]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the model holds (shared ones counted once)."""
    seen: dict[tuple[int, int], int] = {}
    for t in (x for p in [*model.parameters(), *model.buffers()] for x in _storages(p)):
        if t.device.type != "meta":
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


PACKED_MODULES = (PackedProjection, PackedEmbedding, PackedLinear)


def quantize(w: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Symmetric 8-bit: ``q = round(w / scale)`` in [-127, 127], ``scale = max |w| / 127`` per entry
    along `axis` (0: one scale per row). A channel of zeros gets scale 1 (its values are all 0)."""
    w = w.detach().float()
    peak = w.abs().amax(dim=1 - axis)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    shaped = scale[:, None] if axis == 0 else scale[None, :]
    return torch.round(w / shaped).clamp_(-127, 127).to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    return q.float() * (scale.float()[:, None] if axis == 0 else scale.float()[None, :])
