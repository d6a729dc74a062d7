"""The compiled few-token kernel against the dense product it replaces (random and SmolLM2 shapes,
every value dtype, 8-bit scales on either axis), and the fallback where it cannot be built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from smartprune.modules import kernels
from smartprune.modules.packed import PackedMatrix, PackedProjection, dequantize, quantize


def _op():
    op = kernels.packed_product()
    if op is None:
        pytest.skip(f"kernel not built here: {kernels._why_not() or 'the build failed'}")
    return op


def _sparse(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w * (torch.rand(rows, cols, generator=g) >= sparsity)


def _packed(w: torch.Tensor, dtype: torch.dtype = torch.float32, axis: int | None = None) -> PackedMatrix:
    mask = w != 0
    bits = torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))
    if axis is None:
        return PackedMatrix(tuple(w.shape), w[mask].to(dtype).contiguous(), bits=bits)
    from smartprune.modules.packed import Quant

    q, scale = quantize(w, axis)
    return PackedMatrix(tuple(w.shape), q[mask].contiguous(), bits=bits, scale=scale, quant=Quant(axis))


def _count_calls(monkeypatch, name: str) -> list:
    """Count how often the packed modules fetch kernel `name` (one fetch per product that uses it)."""
    import smartprune.modules.packed as packed

    calls, real = [], getattr(kernels, name)

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(packed, name, counted)
    return calls


@pytest.fixture(params=[1, 2], ids=["AVX2", "AVX-512"])
def isa(request):
    """Each of the kernel's one-token loops in turn (AVX-512 only where the CPU has it), restored after."""
    _op()
    best = kernels.kernel_isa()
    if request.param > best:
        pytest.skip("this CPU lacks AVX-512")
    kernels.kernel_isa(request.param)
    yield request.param
    kernels.kernel_isa(best)


# rows not a multiple of 4 exercise the single-row loop after the 4-row blocks of decoding; 24 and 40
# columns (3 and 5 mask bytes) the odd last byte of the AVX-512 loop's 16-column steps
@pytest.mark.parametrize("rows,cols", [(8, 8), (6, 16), (43, 24), (40, 24), (12, 40), (576, 576), (576, 192),
                                       (576, 1536), (1536, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_the_kernel_equals_the_dense_product(rows, cols, sparsity, isa):
    op = _op()
    w = _sparse(rows, cols, sparsity, seed=rows + cols)
    for t in (1, 3, 8):
        x = torch.randn(t, rows, generator=torch.Generator().manual_seed(t))
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
            stored = (w * 20).round().clamp(-127, 127) if dtype == torch.int8 else w
            p = _packed(stored, dtype)
            want = x.double() @ stored.to(dtype).double()
            got = op(x, p.bits, p.values, p.row_ptr, cols)
            assert torch.allclose(got.double(), want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-4)


def test_the_kernel_isa_switch_reports_and_refuses():
    _op()
    best = kernels.kernel_isa()
    assert best in (1, 2)
    assert kernels.kernel_isa(1) == 1 and kernels.kernel_isa() == 1
    if best == 1:
        with pytest.raises(RuntimeError, match="lacks AVX-512"):
            kernels.kernel_isa(2)
    kernels.kernel_isa(best)
    with pytest.raises(RuntimeError, match="want is 0"):
        kernels.kernel_isa(3)


def test_smartprune_kernel_avx2_keeps_the_avx2_loops():
    _op()
    code = "from smartprune.modules import kernels; print(kernels.kernel_isa())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "SMARTPRUNE_KERNEL": "avx2"})
    assert done.stdout.strip() == "1"


@pytest.mark.parametrize("rows,cols", [(8, 8), (43, 24), (12, 40), (576, 1536), (1536, 576)])
def test_the_kernel_for_matrices_stored_without_a_mask_equals_the_dense_product(rows, cols, isa):
    _op()
    op = kernels.dense_product()
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    for t in (1, 3, 8):
        x = torch.randn(t, rows, generator=torch.Generator().manual_seed(t))
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
            values = (w * 20).round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else w.to(dtype)
            want = x.double() @ values.double()
            got = op(x, values.reshape(-1).contiguous(), cols)
            assert torch.allclose(got.double(), want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-4)
    with pytest.raises(RuntimeError, match="rows \\* cols"):
        op(torch.randn(1, rows), w.reshape(-1)[:-8].contiguous(), cols)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_dense_8_bit_projection_decodes_through_the_kernel(axis, monkeypatch):
    """The dense model stored in int8 (no mask) is held packed; decoding reads the 8-bit values directly."""
    _op()
    from smartprune.modules.packed import Quant

    w = torch.randn(576, 192, generator=torch.Generator().manual_seed(1))
    q, scale = quantize(w, axis)
    layer = PackedProjection(PackedMatrix((576, 192), q.reshape(-1), scale=scale, quant=Quant(axis)), bias=None)
    calls = _count_calls(monkeypatch, "dense_product")
    for shape in ((1, 1, 576), (1, 20, 576)):  # a decoding step (the kernel), a prefill (unpacking)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ dequantize(q, scale, axis), atol=1e-4, rtol=1e-4)
    assert len(calls) == 1


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_a_packed_projection_decodes_through_the_kernel_with_the_same_result(axis, monkeypatch):
    _op()
    w = _sparse(576, 192, 0.5)
    layer = PackedProjection(_packed(w, axis=axis), bias=torch.randn(192))
    reference = w if axis is None else dequantize(*quantize(w, axis), axis)
    calls = _count_calls(monkeypatch, "packed_product")
    for shape in ((1, 1, 576), (2, 1, 576), (1, 20, 576)):  # decoding steps, and a prefill
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(calls)))
        before = len(calls)
        with torch.no_grad():
            got = layer(x)
        want = x @ reference + layer.bias
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        assert len(calls) - before == (1 if shape[1] * shape[0] <= kernels.MAX_TOKENS else 0)


def test_without_the_kernel_the_packed_path_stays_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_why_not", lambda: "no C++ compiler (g++ or $CXX) on PATH")
    layer = PackedProjection(_packed(_sparse(64, 32, 0.5)), bias=None)
    x = torch.randn(1, 64)
    with caplog.at_level(logging.WARNING, logger="smartprune.modules.kernels"):
        for _ in range(3):
            assert torch.allclose(layer(x), x @ layer.packed.dense(torch.float32), atol=1e-5)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "no C++ compiler" in caplog.records[0].getMessage() and len(caplog.records) == 1


# output heads: y = a @ W^T with W (rows, cols) read row by row; 40 columns = 5 mask bytes (an odd last one)
@pytest.mark.parametrize("rows,cols", [(1, 8), (7, 24), (33, 40), (3072, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_the_head_kernel_equals_the_dense_product(rows, cols, sparsity, isa):
    op = kernels.rows_product()
    w = _sparse(rows, cols, sparsity, seed=rows * cols)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        stored = (w * 20).round().clamp(-127, 127) if dtype == torch.int8 else w
        p = _packed(stored, dtype)
        every = torch.arange(rows + 1) * cols
        for t in (1, 3, 8):
            x = torch.randn(t, cols, generator=torch.Generator().manual_seed(t))
            want = x.double() @ stored.to(dtype).double().t()
            tol = 1e-4 * max(1.0, want.abs().max().item())
            got = op(x, p.bits, p.values, p.row_ptr, cols)
            assert torch.allclose(got.double(), want, atol=tol, rtol=1e-4)
            got = op(x, torch.empty(0, dtype=torch.uint8), stored.to(dtype).reshape(-1).contiguous(), every, cols)
            assert torch.allclose(got.double(), want, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("masked", [True, False])
def test_a_packed_output_head_decodes_through_the_kernel(axis, masked, monkeypatch):
    """A tied head over a packed table (masked, or every entry in int8) reads it straight from its stored
    form when decoding and unpacks slabs for a prefill; both equal the dense product."""
    _op()
    from smartprune.modules.packed import PackedLinear, Quant

    w = _sparse(1000, 64, 0.5 if masked else 0.0, seed=3)
    if axis is None:
        table, want_w = _packed(w), w
    else:
        q, scale = quantize(w, axis)
        want_w = dequantize(q, scale, axis) * (w != 0)
        table = _packed(w, axis=axis) if masked else PackedMatrix(tuple(w.shape), q.reshape(-1), scale=scale,
                                                                   quant=Quant(axis))
    head = PackedLinear(table)
    calls = _count_calls(monkeypatch, "rows_product")
    for shape in ((1, 1, 64), (2, 1, 64), (1, 20, 64)):  # decoding steps (the kernel), a prefill (slabs)
        h = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            assert torch.allclose(head(h), h @ want_w.t(), atol=1e-4, rtol=1e-4)
    assert len(calls) == 2
