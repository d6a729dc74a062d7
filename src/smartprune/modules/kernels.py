"""The compiled kernel for few-token products with a packed matrix (``csrc/packed_product.cpp``).

Built once per source, torch version and machine kind with the system's C++ compiler against torch's
own headers and libraries (no ninja, no Python bindings: the kernel registers torch operators,
``torch.ops.smartprune.packed_product``, for matrices stored without a mask
``torch.ops.smartprune.dense_product``, for output heads over a stored table (``y = a @ W^T``, row by row)
``torch.ops.smartprune.rows_product``, and runs on torch's thread pool), cached under
``$SMARTPRUNE_CACHE/kernels`` (default ``~/.cache/smartprune/kernels``) and loaded with ``torch.ops.load_library``.
``./run setup`` builds it ahead; otherwise the first packed product does (about 30 s). One library
serves every x86-64 CPU with AVX2: the one-token loops pick AVX-512 at run time where the CPU has it
(``kernel_isa``).

Where it cannot be built (no compiler, a CPU without AVX2 and FMA, another platform) or is switched
off (``SMARTPRUNE_KERNEL=0``) the packed modules keep their pure-torch path (unpack, then multiply),
said once in the log. ``SMARTPRUNE_KERNEL=avx2`` keeps the AVX2 loops on an AVX-512 CPU (to compare).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from smartprune.paths import cache_dir, switch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "packed_product.cpp"
MAX_TOKENS = 8  # the kernel keeps one accumulator per token; more tokens take the unpacking path
_state: dict[str, object] = {}


def _why_not() -> str | None:
    """Why the kernel cannot be built here, or None."""
    if switch("SMARTPRUNE_KERNEL") == "0":
        return "switched off by SMARTPRUNE_KERNEL=0"
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return f"the kernel is written for x86-64 Linux, not {sys.platform} {os.uname().machine}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++ or $CXX) on PATH"
    return None


def _command(out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fopenmp: at::parallel_for is inline and threads only where the including code is built with OpenMP;
    # the library then shares torch's own libgomp (same soname, already loaded)
    return [os.environ.get("CXX", "g++"), "-O3", "-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-fopenmp", "-std=c++20",
            "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include_paths()[0]}", str(SOURCE),
            *(f"-L{p}" for p in library_paths()), "-ltorch_cpu", "-lc10", "-o", str(out)]


def library_path() -> Path:
    """Where this source, built for this torch with these flags, lives in the cache."""
    flags = " ".join(_command(Path("out"))).encode()
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + flags).hexdigest()[:16]
    return cache_dir() / "kernels" / f"packed_product-{key}.so"


def build() -> Path:
    """Compile the kernel into the cache (written under a temporary name, then renamed, so two
    processes building at once never load a half-written library)."""
    target = library_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(_command(Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def packed_product():
    """The operator, built and loaded on first use; None (said once) where it cannot be."""
    if "op" in _state:
        return _state["op"]
    op, why = None, _why_not()
    if why is None:
        try:
            torch.ops.load_library(str(build()))
            op = torch.ops.smartprune.packed_product
            if switch("SMARTPRUNE_KERNEL") == "avx2":  # the AVX2 loops on an AVX-512 CPU (to compare)
                torch.ops.smartprune.kernel_isa(1)
        except (OSError, RuntimeError) as exc:
            why = f"building it failed: {exc}"
    if op is None:
        log.warning("compact decoding kernel unavailable (%s): packed matrices are unpacked for each product, "
                    "which is slower", why)
    _state["op"] = op
    return op


def dense_product():
    """The same library's product with a matrix whose every entry is stored (no mask; e.g. a dense model
    in 8-bit values), or None where the kernel cannot be built."""
    return None if packed_product() is None else torch.ops.smartprune.dense_product


def rows_product():
    """The same library's product with a matrix's transpose, stored row by row (``y = a @ W^T``: an output
    head over the embedding table, masked or every entry stored), or None where the kernel cannot be built."""
    return None if packed_product() is None else torch.ops.smartprune.rows_product


ISA = {1: "AVX2", 2: "AVX-512"}


def kernel_isa(want: int = 0) -> int:
    """Which loops the one-token products take: 1 = AVX2, 2 = AVX-512 (the default where the CPU has
    AVX-512 F). ``want`` 1 or 2 switches for the whole process (benchmarks and tests
    compare the two); 0 only reports. 0 where the kernel cannot be built."""
    if packed_product() is None:
        return 0
    return int(torch.ops.smartprune.kernel_isa(want))


def main() -> int:
    """``python -m smartprune.modules.kernels``: build the kernel now (``./run setup`` does)."""
    why = _why_not()
    if why is not None:
        print(f"compact decoding kernel not built: {why}")
        return 0
    try:
        print(f"compact decoding kernel: {build()}")
        print(f"  one-token loops: {ISA[kernel_isa()]}")
    except RuntimeError as exc:
        print(f"compact decoding kernel not built: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
