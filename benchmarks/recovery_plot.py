"""Held-out perplexity against tokens seen for the demo's recovery runs (benchmarks/recovery.sh):
writes docs/recovery-results/held-out-vs-tokens.png from runs/recovery/demo-*.json.

    .venv/bin/python benchmarks/recovery_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

from smartprune.reporting.figures import recovery_figure, save

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    runs = {}
    for name in ("demo-quick", "demo-full"):
        path = ROOT / "runs" / "recovery" / f"{name}.json"
        if path.is_file():
            rec = json.loads(path.read_text())["report"]["recovery"]
            c = rec["config"]
            runs[f"{name}: {c['batch_size']} x {c['seqlen']} tokens/step, lr {c['lr']:g}"] = rec["held_out"]
    out = ROOT / "docs" / "recovery-results" / "held-out-vs-tokens.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save(recovery_figure(runs, "smollm2-135m, paper recipe: recovery on 2 CPU cores"), out)
    print(out)


if __name__ == "__main__":
    main()
