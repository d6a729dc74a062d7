"""What keeping glibc's heap (`device.retained_heap`) buys recovery and evaluation: the same recovery steps and
perplexity windows of a compressed model, each in a fresh process, with the heap kept and with glibc's
default (a fresh mapping from the kernel for every block above 32 MiB, given back when freed).

    python benchmarks/recovery_heap.py runs/srec/slim-40/hf --out runs/heap

Results: ``recovery-heap.json`` and ``.md`` in --out. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from smartprune.files import write_results

MODEL = "smollm2-135m"

CHILD = """
import json, sys, time, resource
import smartprune.device as device
if sys.argv[2] == "off":
    device._glibc = lambda: None  # retained_heap then changes nothing
from smartprune.recipes.schema import RECOVERY_BUDGETS, RecoverConfig
from smartprune.storage.sources import converted_builtin, load_model
from smartprune.training.recover import recover
from smartprune.evaluation.perplexity import perplexity
loaded = load_model(sys.argv[1])
student, tokenizer = loaded.model, loaded.tokenizer
teacher = load_model(converted_builtin("smollm2-135m")).model
cfg = RecoverConfig(**{**RECOVERY_BUDGETS["full"], "objective": "end_to_end", "steps": int(sys.argv[3]),
                       "eval_every": 10**6})
r = recover(student, tokenizer, cfg, teacher=teacher, progress=False)
t = time.perf_counter()
with device.retained_heap():  # evaluation does not keep the heap on its own (measured here: no gain)
    perplexity(student, tokenizer, "wikitext2", limit=int(sys.argv[4]), progress=False)
ppl_s = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"recover_seconds": r["seconds"], "perplexity_seconds": ppl_s, "user_s": u.ru_utime,
                  "system_s": u.ru_stime, "minor_faults": u.ru_minflt}))
"""


def measure(folder: str, heap: str, steps: int, windows: int) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, folder, heap, str(steps), str(windows)], check=True,
                         capture_output=True, text=True).stdout
    return {"heap": heap, **json.loads(out.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("compressed", help="a compressed SmolLM2-135M as a plain folder (`compress --dense-out`)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8, help="recovery steps of the full budget's 4 x 256 tokens (8)")
    p.add_argument("--windows", type=int, default=8, help="WikiText-2 windows of 1024 tokens (8)")
    args = p.parse_args()
    rows = [measure(args.compressed, heap, args.steps, args.windows) for heap in ("off", "on", "off", "on")]
    lines = [f"# Keeping glibc's heap in recovery and evaluation ({args.compressed})", "",
             f"{args.steps} end-to-end recovery steps of 4 x 256 tokens (distillation from {MODEL}), then "
             f"{args.windows} WikiText-2 windows of 1024 tokens, each row a fresh process, alternating.", "",
             "| heap kept | recovery s | perplexity s | user s | system s | minor page faults |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['heap']} | {r['recover_seconds']:.1f} | {r['perplexity_seconds']:.1f} | {r['user_s']:.1f} | "
              f"{r['system_s']:.1f} | {r['minor_faults']:,} |" for r in rows]
    write_results(args.out, "recovery-heap", {"compressed": args.compressed, "steps": args.steps,
                                              "windows": args.windows, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
