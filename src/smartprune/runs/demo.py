"""`smartprune demo`: compress a model, retrain it, and show dense / compressed / recovered quality."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from smartprune.compression.accounting import format_table
from smartprune.files import write_json
from smartprune.runs.compress import stage_seconds
from smartprune.runs.pipeline import execute
from smartprune.runs.spec import RunSpec


@dataclass
class DemoRun:
    model: str
    recipe: str
    dense: dict
    compressed: dict
    report: dict
    recovered: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    cost: dict | None = None  # running cost of the final model against dense (`_running_cost`)
    schedule: str = ""  # what --quick changed in the recipe's schedule

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        d, c, r = self.dense, self.compressed, self.recovered
        s = self.seconds
        rows = [("dense", d), ("compressed", c)] + ([("compressed + recovered", r)] if r else [])
        lines = [f"{self.model}, recipe '{self.recipe}'" + (f" ({self.schedule})" if self.schedule else ""), "",
                 f"WikiText-2 test perplexity, first {d['windows']} windows of {d['seqlen']} tokens "
                 f"({d['tokens']:,} scored tokens):", "", "| model | perplexity |", "|---|---:|"]
        for name, res in rows:
            ratio = "" if res is d else f" ({res['perplexity'] / d['perplexity']:,.2f}x dense)"
            lines.append(f"| {name} | {res['perplexity']:,.2f}{ratio} |")
        lines += ["", format_table(self.report, stage_seconds(self.report), self.report.get("seconds")), ""]
        if r:
            rec = self.report["recovery"]
            fits = rec.get("blockwise")
            fitted = (f"{fits['block_steps']} block-wise steps per block on {fits['cache_windows']} cached windows, "
                      "then ") if fits else ""
            lines += [f"recovery: {fitted}{rec['steps']} end-to-end steps of {rec['config']['batch_size']} x "
                      f"{rec['config']['seqlen']} tokens ({rec['tokens']:,} tokens of {rec['text']} train, teacher: "
                      f"the dense model), structure kept: {'yes' if rec['structure']['kept'] else 'NO'}", ""]
        if self.cost:
            from smartprune.runs.cost import cost_table

            c = self.cost
            final = "compressed + recovered" if r else "compressed"
            rows = [{"method": "dense", "sparsity": "0%", "running": [c["dense"]]},
                    {"method": final, "sparsity": f"{self.report['overall']['compression']:.1%}",
                     "running": c["compressed"]}]
            lines += [f"What it buys, against the dense model (one bench run on this machine, float32, "
                      f"{c['machine'].get('threads', '?')} threads; greedy decoding of {c['new_tokens']} tokens "
                      f"at batch 1, {c['length']}-token prefill; peak RSS of a fresh process that loads the "
                      "model and runs one forward; held as: plain matrices, or the packed form):", "",
                      cost_table(rows, c["length"]), ""]
        times = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in s.items())
        return "\n".join([*lines, f"time: {times}"])


def run_demo(model: str = "smollm2-135m", recipe: str | Path = "paper", *, quick: bool = False,
             recover_steps: int | None = None, measure: bool = True, **options) -> DemoRun:
    """The main job: perplexity of MODEL before and after compressing it with `recipe`, and after
    retraining the compressed model (distillation from the dense one; ``recover_steps=0`` skips it).

    Default subset: the first 16 windows of 1024 tokens of the WikiText-2 test text (``limit``,
    ``seqlen``). ``quick`` uses 4 evaluation windows, 8 calibration windows of 64 tokens and a shorter
    recovery; ``recover_objective`` ("end_to_end" or "blockwise") replaces the recovery's objective. With
    ``measure`` the final model's running cost is then measured against the dense one (decoding speed,
    prefill, peak RSS, bytes held; `pipeline.measure_cost`). Other `options`: `RunSpec.of`'s keywords
    (``seed``, ``device``, ``json_path``, ``progress``, ...).
    """
    # Recovery stays end-to-end by default, quick or not: block fits alone won on a structured model
    # (width-40) but lost on `paper` in both time and quality (docs/frontier.md, "The quick demo").
    spec = RunSpec.of(model, recipe, evaluate=True, quick=quick, measure=measure, recover_steps=recover_steps,
                      recover_budget="quick" if quick else "full", **options)
    r = execute(spec)
    e = r.evaluations
    run = DemoRun(model, r.prepared.recipe.name, e["dense"], e["compressed"], r.report, e.get("recovered"),
                  r.seconds, r.cost, r.prepared.schedule)
    if spec.outputs.json_path:
        write_json(spec.outputs.json_path, run.to_dict())
    return run
