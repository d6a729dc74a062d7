"""Where a model runs and in what precision: ``--device auto|cpu|cuda|cuda:N`` and
``--compute-dtype auto|float32|bfloat16|float16``.

``auto`` picks the first GPU when torch sees one, else the CPU; the compute dtype ``auto`` is
bfloat16 on a GPU and float32 on the CPU (half-precision matmuls are slow on CPUs). Statistics and
losses are accumulated in float32 by their callers whatever the compute dtype.
"""

from __future__ import annotations

import contextlib

import torch

from smartprune.errors import DeviceError, did_you_mean

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device for `spec`; a GPU asked for on a machine without one is a `DeviceError`."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2] or "0"
        if not index.isdigit():
            raise DeviceError(f"device '{spec}': expected cuda or cuda:N with N a GPU number")
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{spec}' asked for, but torch sees no GPU here (use --device cpu or auto)")
        if int(index) >= torch.cuda.device_count():
            raise DeviceError(f"device '{spec}': this machine has {torch.cuda.device_count()} GPU(s), "
                              f"numbered from 0")
        return torch.device(f"cuda:{index}")
    raise DeviceError(f"unknown device '{spec}'{did_you_mean(spec, ['auto', 'cpu', 'cuda'])}; "
                      "expected auto, cpu, cuda or cuda:N")


def resolve_compute_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The dtype forward passes run in: `spec`, or for ``auto`` bfloat16 on a GPU and float32 on a CPU."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in COMPUTE_DTYPES:
        raise DeviceError(f"unknown compute dtype '{spec}'{did_you_mean(spec, COMPUTE_DTYPES)}; "
                          f"expected auto, {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[spec]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes in `dtype` (weights stay float32); a no-op for float32.

    Without torch's cast cache: it keeps the first low-precision copy of each weight for the whole
    region, and the engine prunes and fits weights in place inside one region, so every later forward
    would have run the dense copy (on the first GPU run every block's sensitivity read zero). Casting
    each weight once per use costs little beside the products."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (inputs are moved there)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_retained_depth = 0  # retained_heap's nesting (only the outermost sets and restores glibc's thresholds)


def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def retained_heap():
    """Within: the C library's allocator serves large CPU tensors from its heap and keeps them when freed.
    By default glibc maps fresh pages from the kernel for every allocation above 32 MiB and unmaps them
    when it is freed, so a phase that allocates the same large tensors thousands of times (an allocation's
    measurement: logits over the vocabulary, activations of later blocks) pays a page fault per 4 KiB each
    time: on SmolLM2-135M a quarter of the time of a joint measurement, measured. After: the thresholds
    glibc's own adjustment reaches (32 / 64 MiB), and the memory kept given back. Elsewhere than glibc on
    Linux, nothing changes. Nested uses (an evaluation inside a recovery) leave it to the outermost."""
    global _retained_depth
    libc = _glibc()
    if libc is None or _retained_depth:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    _retained_depth += 1
    try:
        yield
    finally:
        _retained_depth -= 1
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)
