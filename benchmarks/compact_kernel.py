"""Decoding from the packed form: a compressed folder held compact, with the compiled few-token kernel
and without it, in float32, bfloat16 and int8 values, against the dense model (``smartprune bench``).

    python benchmarks/compact_kernel.py COMPRESSED --out runs/kernel [--dense smollm2-135m]

COMPRESSED is a folder written by ``compress --out`` (e.g. SparseGPT at 50% of the block linears).
Its bfloat16 and int8 re-encodings are written into --out (the same masks and values, stored
narrower); with --same-precision the dense model's own bfloat16 and int8 re-encodings beside them. One
bench run against the dense model in the same process with the kernel; with --avx2 another with
``SMARTPRUNE_KERNEL=avx2`` (the AVX2 loops on an AVX-512 CPU), with --unpack one with
``SMARTPRUNE_KERNEL=0`` (the unpacking path, ~0.1x dense decoding: slow), each in a child process.
Results: ``kernel.json`` and ``kernel.md`` in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from smartprune.files import write_results
from smartprune.runs.bench import BenchSettings, bench
from smartprune.storage.load import load
from smartprune.storage.save import save

METRICS = (("decode tok/s", "generate_tokens_per_s", 1, 2), ("512 prefill s", "latency_b1_512", 1, 3),
           ("held in memory MB", "resident_bytes", 1e-6, 0), ("peak RSS MB", "peak_rss_bytes", 1e-6, 0))


def narrower(folder: Path, out: Path) -> list[str]:
    """The folder and its bfloat16 and int8 re-encodings (written once)."""
    specs = [str(folder)]
    for dtype in ("bfloat16", "int8"):
        target = out / f"{folder.name}-{dtype}"
        if not target.is_dir():
            from transformers import AutoTokenizer

            save(load(folder, structured=False), target, tokenizer=AutoTokenizer.from_pretrained(folder), dtype=dtype)
        specs.append(str(target))
    return specs


def dense_narrower(dense: str, out: Path) -> list[str]:
    """The dense model's own bfloat16 and int8 re-encodings (every entry stored, no mask, held compact and
    decoded by the kernel's unmasked loops): the reference in the same precision (written once)."""
    from smartprune.storage.sources import load_model

    specs = []
    for dtype in ("bfloat16", "int8"):
        target = out / f"dense-{dtype}"
        if not target.is_dir():
            loaded = load_model(dense)
            save(loaded.model, target, tokenizer=loaded.tokenizer, dtype=dtype)
        specs.append(str(target))
    return specs


def run_bench(specs: list[str], repeats: int) -> dict:
    settings = BenchSettings(repeats=repeats, lengths=(512,), batches=(8,), residencies=("compact",), device="cpu",
                             compute_dtypes=("float32",), train=False)
    return bench(specs, settings, progress=False).to_dict()


def markdown(data: dict) -> str:
    lines = ["# Decoding from the packed form", "",
             f"{data['folder']} held compact against the dense model ({data['dense']}), float32 compute, median of "
             f"{data['repeats']} interleaved rounds; (xR) = ratio to dense in the same run.", ""]
    for label, key in (("with the compiled kernel", "kernel"),
                       ("the kernel's AVX2 loops (SMARTPRUNE_KERNEL=avx2)", "avx2"),
                       ("without it (SMARTPRUNE_KERNEL=0)", "unpack")):
        if key not in data:
            continue
        models = data[key]["models"]
        lines += [f"## {label}", "", "| model | " + " | ".join(m[0] for m in METRICS) + " |",
                  "|---|" + "---:|" * len(METRICS)]
        for m in models:
            cells = []
            for _, k, scale, digits in METRICS:
                v = m["metrics"].get(k)
                cells.append("-" if v is None else f"{v * scale:,.{digits}f}" + ("" if m["baseline"] else
                             f" (x{m['ratios'][k]:.2f}{' time' if k.startswith('latency') else ''})"))
            lines.append(f"| {Path(m['name']).name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--unpack", action="store_true", help="also bench the unpacking path (SMARTPRUNE_KERNEL=0)")
    p.add_argument("--avx2", action="store_true", help="also bench the kernel's AVX2 loops on an AVX-512 CPU")
    p.add_argument("--same-precision", action="store_true",
                   help="also bench the dense model's bfloat16 and int8 re-encodings (the same-precision reference)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a run under another SMARTPRUNE_KERNEL, in its own process
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    specs = [args.dense, *(dense_narrower(args.dense, args.out) if args.same_precision else []),
             *narrower(args.folder, args.out)]
    if args.child:
        Path(args.child).write_text(json.dumps(run_bench(specs, args.repeats)))
        return
    data = {"folder": str(args.folder), "dense": args.dense, "repeats": args.repeats,
            "kernel": run_bench(specs, args.repeats)}
    for key, value, wanted in (("avx2", "avx2", args.avx2), ("unpack", "0", args.unpack)):
        if not wanted:
            continue
        child = args.out / f"{key}.json"
        env = {**os.environ, "SMARTPRUNE_KERNEL": value}
        subprocess.run([sys.executable, __file__, str(args.folder), "--out", str(args.out), "--dense", args.dense,
                        "--repeats", str(args.repeats), "--child", str(child),
                        *(["--same-precision"] if args.same_precision else [])], check=True, env=env)
        data[key] = json.loads(child.read_text())
    write_results(args.out, "kernel", data, markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
