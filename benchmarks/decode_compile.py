"""Greedy decoding of a model in transformers, eager against a static KV cache compiled by torch.compile
(inductor), in one process: how much of the per-token overhead of an eager forward compilation removes.

transformers compiles the forward for generation only on GPUs unless the compile config says otherwise
(``CompileConfig._compile_all_devices``); this sets it. Rounds: 64 new tokens after a 16-token prompt,
each setting warmed up first (the compilation's seconds reported apart).

    python benchmarks/decode_compile.py --out runs/decode [--model DIR] [--threads 2] [--rounds 3]

Results: ``decode_compile.json`` and ``decode_compile.md`` in --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from smartprune.files import write_results

NEW = 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", help="a Hugging Face folder (default: the built-in SmolLM2-135M, fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", default="default", help="torch.compile mode (default)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM
    from transformers.generation.configuration_utils import CompileConfig

    from smartprune.storage.sources import converted_builtin

    torch.set_num_threads(args.threads)
    folder = args.model or str(converted_builtin("smollm2-135m"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    def seconds(n: int, **kw) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kw)
        return time.perf_counter() - start

    compiled = CompileConfig(fullgraph=False, dynamic=False, mode=args.mode)
    compiled._compile_all_devices = True  # transformers compiles on GPUs only unless told
    settings = {"eager, dynamic cache": {}, "eager, static cache": {"cache_implementation": "static"},
                f"compiled ({args.mode}), static cache": {"cache_implementation": "static", "compile_config": compiled}}
    rows = {}
    for name, kw in settings.items():
        warm = seconds(8, **kw)
        rates = [NEW / seconds(NEW, **kw) for _ in range(args.rounds)]
        rows[name] = {"tokens_per_s": statistics.median(rates), "rounds": rates, "warm_up_s": warm}
        print(f"{name}: {statistics.median(rates):.2f} tok/s (rounds {[round(r, 2) for r in rates]}, warm-up "
              f"{warm:.1f} s)", flush=True)
    base = rows["eager, dynamic cache"]["tokens_per_s"]
    md = ["# Decoding: eager against compiled", "",
          f"{folder}, fp32, {args.threads} threads, {NEW} new tokens, median of {args.rounds} rounds.", "",
          "| setting | tok/s | x eager | warm-up s |", "|---|---:|---:|---:|"]
    md += [f"| {n} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x | {r['warm_up_s']:.1f} |"
           for n, r in rows.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, "decode_compile", {"model": folder, "threads": args.threads, "new_tokens": NEW,
                                               "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
