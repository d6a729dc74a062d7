"""Where the peak memory of "load + one forward" goes: resident memory (VmRSS, MiB) of a fresh process
after each step (imports, tokenizer, weights, every --every-th block of the forward, the output head),
one process per model and residency, as `smartprune bench` measures its peak.

    python benchmarks/memory_profile.py smollm2-135m runs/compact/paper --out runs/compact/memory

Writes ``memory.json`` and ``memory.md`` in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from smartprune.files import write_results
from smartprune.storage.sources import is_compressed

# Run in the fresh process: the steps of a load and a forward, with VmRSS (MB) after each.
PROBE = """
import json, sys
def rss():
    return next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmRSS'))
steps = []
import torch, transformers, smartprune
from smartprune.storage.sources import load_model
torch.set_num_threads(1)
steps.append(("imports (torch, transformers, smartprune)", rss()))
loaded = load_model(SPEC, resident=RESIDENT)
steps.append(("loaded (weights and tokenizer)", rss()))
model = loaded.model
blocks = model.get_decoder().layers
for i, b in enumerate(blocks):
    if i % EVERY == EVERY - 1 or i == len(blocks) - 1:
        b.register_forward_hook(lambda m, a, o, i=i: steps.append((f"forward: after block {i}", rss())))
model.get_output_embeddings().register_forward_hook(lambda m, a, o: steps.append(("forward: after the head", rss())))
with torch.no_grad():
    model(torch.zeros(1, LENGTH, dtype=torch.long))
peak = next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(json.dumps({"steps": steps, "peak_mb": peak}))
"""


def profile(spec: str, resident: str, length: int, every: int) -> dict:
    code = PROBE.replace("SPEC", repr(spec)).replace("RESIDENT", repr(resident)).replace(
        "LENGTH", str(length)).replace("EVERY", str(every))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"model": spec, "resident": resident, **json.loads(out.stdout.strip().splitlines()[-1])}


def markdown(rows: list[dict], length: int) -> str:
    names = [f"{r['model']} [{r['resident']}]" for r in rows]
    lines = [f"VmRSS (MiB) of a fresh process after each step; one forward of {length} tokens, 1 thread.", "",
             "| step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(rows)]
    for j, (label, _) in enumerate(rows[0]["steps"]):
        lines.append(f"| {label} | " + " | ".join(str(r["steps"][j][1]) for r in rows) + " |")
    lines.append("| **peak (VmHWM)** | " + " | ".join(f"**{r['peak_mb']}**" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--resident", nargs="+", default=["compact", "dense"])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--every", type=int, default=10, help="RSS after every N-th block (10)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows = [profile(spec, r, args.length, args.every) for spec in args.models
            for r in (args.resident if is_compressed(spec) else ["dense"])]
    write_results(args.out, "memory", {"settings": {"length": args.length, "every": args.every}, "models": rows},
                  markdown(rows, args.length))
    print(markdown(rows, args.length))


if __name__ == "__main__":
    main()
