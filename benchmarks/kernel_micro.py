"""The compiled few-token kernel alone: one token times every block linear of a SmolLM2-135M-shaped model
(30 blocks x Q, K, V, O, gate, up, down; random weights at --sparsity), packed, against torch's dense
product of the same matrices, on the same thread count.

    python benchmarks/kernel_micro.py --out runs/kernel-micro

Median of --repeats passes over all 210 matrices (after one warm-up pass), per value dtype, through the
kernel's AVX2 loops and, where the CPU has AVX-512, its AVX-512 loops; beside them the kernel's product
with every entry stored (no mask) in bfloat16 and int8, the dense reference in the same precision. What it
isolates: the product itself, without the rest of a decoding step (attention, norms, the output head,
Python), which `benchmarks/compact_kernel.py` measures end to end. Writes ``micro.json`` and ``micro.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from smartprune.files import write_results
from smartprune.modules.kernels import ISA, dense_product, kernel_isa, packed_product

# (d_in, d_out) of one SmolLM2-135M block's linears: Q, K, V, O, gate, up, down
BLOCK = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def matrices(sparsity: float, blocks: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(blocks):
        for rows, cols in BLOCK:
            w = torch.randn(rows, cols, generator=g)
            mask = torch.rand(rows, cols, generator=g) >= sparsity
            row_ptr = torch.zeros(rows + 1, dtype=torch.long)
            row_ptr[1:] = mask.sum(1).cumsum(0)
            values = w[mask].contiguous()
            out.append({"dense": (w * mask).contiguous(), "cols": cols, "row_ptr": row_ptr,
                        "bits": torch.from_numpy(np.packbits(mask.numpy(), axis=1).reshape(-1)),
                        "values": {"float32": values, "bfloat16": values.to(torch.bfloat16),
                                   "int8": values.clamp(-1, 1).mul(127).round().to(torch.int8)},
                        # every entry stored, no mask: the dense reference in the same narrow precision
                        "unmasked": {"bfloat16": (w * mask).reshape(-1).to(torch.bfloat16),
                                     "int8": (w * mask).reshape(-1).clamp(-1, 1).mul(127).round().to(torch.int8)}})
    return out


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    op = packed_product()
    if op is None:
        raise SystemExit("the kernel is not built here (a C++ compiler is needed)")
    dense_op = dense_product()
    mats = matrices(args.sparsity, args.blocks)
    xs = {r: torch.randn(1, r) for r in {m["dense"].shape[0] for m in mats}}

    def dense() -> None:
        for m in mats:
            xs[m["dense"].shape[0]] @ m["dense"]

    def unmasked(dtype: str):
        def run() -> None:
            for m in mats:
                dense_op(xs[m["dense"].shape[0]], m["unmasked"][dtype], m["cols"])
        return run

    def packed(dtype: str):
        def run() -> None:
            for m in mats:
                op(xs[m["dense"].shape[0]], m["bits"], m["values"][dtype], m["row_ptr"], m["cols"])
        return run

    base = timed(dense, args.repeats)
    rows = [{"product": "dense (torch)", "ms": base * 1e3, "time_vs_dense": 1.0}]
    best = kernel_isa()
    for isa in range(1, best + 1):  # AVX2, then AVX-512 where the CPU has it
        kernel_isa(isa)
        for name in ("bfloat16", "int8"):
            t = timed(unmasked(name), args.repeats)
            rows.append({"product": f"dense, {name} values, no mask ({ISA[isa]})", "isa": ISA[isa], "ms": t * 1e3,
                         "time_vs_dense": t / base})
        for name in DTYPES:
            t = timed(packed(name), args.repeats)
            rows.append({"product": f"packed, {name} values ({ISA[isa]})", "isa": ISA[isa], "ms": t * 1e3,
                         "time_vs_dense": t / base})
    kernel_isa(best)
    data = {"sparsity": args.sparsity, "matrices": len(mats), "threads": torch.get_num_threads(),
            "repeats": args.repeats, "rows": rows}
    md = [f"# One token through {len(mats)} SmolLM2-shaped block linears at {args.sparsity:.0%} sparsity",
          "", f"{torch.get_num_threads()} threads, median of {args.repeats} passes.", "",
          "| product | ms per token | time vs dense |", "|---|---:|---:|"]
    md += [f"| {r['product']} | {r['ms']:.2f} | {r['time_vs_dense']:.2f}x |" for r in rows]
    write_results(args.out, "micro", data, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
