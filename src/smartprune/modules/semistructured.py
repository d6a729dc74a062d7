"""2:4 sparse matrices run by the GPU's sparse tensor cores (torch's semi-structured sparse tensors:
cuSPARSELt, or CUTLASS where cuSPARSELt is missing).

A matrix pruned with ``pattern: 2:4`` (FPP, magnitude, Wanda, SparseGPT) has at most two non-zeros in
every group of four consecutive inputs of each output: the layout NVIDIA GPUs since Ampere multiply at
up to twice the dense rate, from half the values plus 2-bit positions. `use_semi_structured` swaps every
such projection of a model already on a GPU for `SemiStructuredProjection`; nothing else changes.

torch implements these tensors on CUDA only, so on a CPU this refuses (one line) instead of running a
slow emulation; measured speed-ups: ``benchmarks/semi_structured.py`` and docs/compact-results.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smartprune.errors import DeviceError
from smartprune.modules.masked import Projection
from smartprune.modules.packed import PackedProjection

log = logging.getLogger(__name__)
SEMI_DTYPES = (torch.float16, torch.bfloat16)  # what both backends take for floating-point weights
MIN_SIDE = 64  # both sides a multiple of this fits every backend's minimum tile (CUTLASS fp16: 32 x 64)


def is_two_four(weight_t: Tensor) -> bool:
    """Whether an (outputs, inputs) matrix has at most 2 non-zeros in every 4 consecutive inputs."""
    rows, cols = weight_t.shape
    return cols % 4 == 0 and bool(((weight_t != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def _to_semi_structured(weight_t: Tensor) -> Tensor:
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight_t)


class SemiStructuredProjection(nn.Module):
    """``y = x @ W + b`` with ``W^T`` held as a semi-structured sparse tensor in `dtype` (fp16/bf16).
    Inputs are cast to that dtype for the product and the result back to theirs."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype,
                 convert: Callable[[Tensor], Tensor] = _to_semi_structured) -> None:
        super().__init__()
        self.d_in, self.d_out = weight.shape
        self.weight = nn.Parameter(convert(weight.detach().T.contiguous().to(dtype)), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype).contiguous(), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, 2:4 semi-structured"


def _weight_of(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(W as d_in x d_out, bias) of a plain or packed projection; None for any other module."""
    if type(module) is Projection:
        return module.weight.detach(), module.bias
    if isinstance(module, PackedProjection):
        return module.packed.dense(torch.float32), module.bias
    return None


def use_semi_structured(model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                        convert: Callable[[Tensor], Tensor] = _to_semi_structured) -> list[str]:
    """Swap every 2:4 projection of `model` (on a CUDA device) for its semi-structured twin; returns the
    swapped paths. Matrices whose sides are not multiples of 64 stay as they are (the kernels' tiles)."""
    if dtype not in SEMI_DTYPES:
        raise DeviceError(f"semi-structured sparsity runs in float16 or bfloat16, not {dtype}")
    device = next(model.parameters()).device
    if convert is _to_semi_structured and device.type != "cuda":
        raise DeviceError(f"semi-structured (2:4) sparse kernels need a CUDA GPU; the model is on {device}")
    swapped = []
    for path, module in list(model.named_modules()):
        found = _weight_of(module)
        if found is None:
            continue
        weight, bias = found
        if weight.shape[0] % MIN_SIDE or weight.shape[1] % MIN_SIDE or not is_two_four(weight.T):
            continue
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, SemiStructuredProjection(weight, bias, dtype, convert))
        swapped.append(path)
    log.info("semi-structured 2:4: %d projections swapped", len(swapped))
    return swapped
