"""Where a CSR matrix product beats the dense one on this CPU, for SmolLM2's feed-forward shapes.

For each shape (d_in x d_out), token count and sparsity, times ``x @ W`` dense (the masked matrix as
is) and through ``torch.sparse`` CSR, interleaved, median of --repeats; writes JSON and Markdown with
the speed-up (dense time / CSR time) and, per shape and token count, the lowest sparsity from which
CSR is faster at every higher sparsity measured (the crossover that `smartprune.modules.structured` uses).

    python benchmarks/sparse_crossover.py --out runs/crossover
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

SHAPES = [(576, 1536), (1536, 576)]  # SmolLM2-135M: up/gate, down
TOKENS = [1, 128, 512]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for d_in, d_out in SHAPES:
        w = torch.randn(d_in, d_out, generator=g)
        for sparsity in SPARSITIES:
            masked = w * (torch.rand(d_in, d_out, generator=g) >= sparsity)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                csr = masked.t().contiguous().to_sparse_csr()
            for n in TOKENS:
                x = torch.randn(n, d_in, generator=g)
                with torch.no_grad():
                    dense_s = _time(lambda x=x, m=masked: x @ m, repeats)
                    csr_s = _time(lambda x=x, c=csr: (c @ x.t()).t(), repeats)
                rows.append({"d_in": d_in, "d_out": d_out, "tokens": n, "sparsity": sparsity,
                             "dense_s": dense_s, "csr_s": csr_s, "speedup": dense_s / csr_s})
    return rows


def crossovers(rows: list[dict]) -> list[dict]:
    out = []
    for d_in, d_out in SHAPES:
        for n in TOKENS:
            series = sorted((r for r in rows if (r["d_in"], r["d_out"], r["tokens"]) == (d_in, d_out, n)),
                            key=lambda r: r["sparsity"])
            cross = None
            for i, r in enumerate(series):
                if all(s["speedup"] > 1 for s in series[i:]):
                    cross = r["sparsity"]
                    break
            out.append({"d_in": d_in, "d_out": d_out, "tokens": n, "crossover_sparsity": cross})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/crossover")
    args = p.parse_args()
    rows = measure(args.repeats, args.threads)
    cross = crossovers(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats}
    (out / "crossover.json").write_text(json.dumps({"meta": meta, "rows": rows, "crossovers": cross}, indent=2))
    lines = ["| shape | tokens | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " | crossover |",
             "|---|---:|" + "---:|" * (len(SPARSITIES) + 1)]
    for c in cross:
        series = [r for r in rows if (r["d_in"], r["d_out"], r["tokens"]) == (c["d_in"], c["d_out"], c["tokens"])]
        cells = " | ".join(f"{r['speedup']:.2f}x" for r in sorted(series, key=lambda r: r["sparsity"]))
        cr = "none" if c["crossover_sparsity"] is None else f"{c['crossover_sparsity']:.0%}"
        lines.append(f"| {c['d_in']}x{c['d_out']} | {c['tokens']} | {cells} | {cr} |")
    (out / "crossover.md").write_text("CSR speed-up over dense (dense time / CSR time)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
