"""`smartprune demo`: compress a model, retrain it, and show dense / compressed / recovered quality."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from smartprune.compression.accounting import format_table
from smartprune.files import write_json
from smartprune.runs.compress import stage_seconds
from smartprune.runs.pipeline import execute, measure_cost
from smartprune.runs.preflight import preflight
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


# The main job's two recipes: the paper's, reproduced honestly, and the best quality per byte measured here
DEMO_RECIPES = ("paper", "smart-40")


@dataclass
class Demo:
    """The demo's runs (one per recipe, same model, windows and recovery budget) and their side-by-side
    summary; the running costs of all final models come from one bench run."""

    runs: list[DemoRun]
    measure_seconds: float | None = None  # the one bench run of every final model

    def to_dict(self) -> dict:
        return self.runs[0].to_dict() if len(self.runs) == 1 else {"runs": [r.to_dict() for r in self.runs]}

    def summary(self) -> str:
        if len(self.runs) == 1:
            return self.runs[0].summary()
        parts = [r.summary() for r in self.runs]
        return "\n\n".join([*parts, self.side_by_side()])

    def side_by_side(self) -> str:
        """One line per recipe: perplexities and what the final model buys against dense."""
        d = self.runs[0].dense
        lines = [f"Side by side (WikiText-2 on {d['windows']} windows, dense {d['perplexity']:,.2f}; running cost "
                 "against dense from one bench run):", "",
                 "| recipe | compression | compressed | recovered | decode | prefill | held in memory | peak RSS |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.runs:
            final = r.recovered or r.compressed
            ratios = r.cost["compressed"][-1]["ratios"] if r.cost else {}
            prefill = f"latency_b1_{r.cost['length']}" if r.cost else ""

            def x(key: str, inverse: bool = False, ratios=ratios) -> str:
                v = ratios.get(key)
                return "" if v is None else f"{1 / v if inverse else v:.2f}x"

            lines.append(f"| {r.recipe} | {r.report['overall']['compression']:.1%} | "
                         f"{r.compressed['perplexity']:,.2f} | "
                         f"{final['perplexity']:,.2f} ({final['perplexity'] / d['perplexity']:,.2f}x) | "
                         f"{x('generate_tokens_per_s')} | {x(prefill, True)} | {x('resident_bytes')} | "
                         f"{x('peak_rss_bytes')} |")
        lines += ["", "decode and prefill: speed-up over dense (above 1 is faster); memory: fraction of dense"]
        if self.measure_seconds is not None:
            lines.append(f"time: the one bench run of all {len(self.runs)} final models {self.measure_seconds:.0f} s")
        return "\n".join(lines)


def run_demo(model: str = "smollm2-135m", recipe: str | Path = "paper", *, quick: bool = False,
             recover_steps: int | None = None, measure: bool = True, **options) -> DemoRun:
    """The main job for one recipe: perplexity of MODEL before and after compressing it with `recipe`,
    and after retraining the compressed model (distillation from the dense one; ``recover_steps=0``
    skips it); `run_demos` with one recipe."""
    return run_demos(model, (recipe,), quick=quick, recover_steps=recover_steps, measure=measure, **options).runs[0]


def run_demos(model: str = "smollm2-135m", recipes: tuple[str | Path, ...] = DEMO_RECIPES, *, quick: bool = False,
              recover_steps: int | None = None, measure: bool = True, **options) -> Demo:
    """The main job: for each recipe, perplexity of MODEL before and after compressing it, and after
    retraining the compressed model (distillation from the dense one, the same budget for each;
    ``recover_steps=0`` skips it). Default: the paper's recipe and ``smart-40`` side by side.

    Default subset: the first 16 windows of 1024 tokens of the WikiText-2 test text (``limit``,
    ``seqlen``). ``quick`` uses 4 evaluation windows, 8 calibration windows of 64 tokens and a shorter
    recovery; ``recover_objective`` ("end_to_end" or "blockwise") replaces the recovery's objective. With
    ``measure`` the final models' running cost is then measured against the dense one in one bench run
    (decoding speed, prefill, peak RSS, bytes held; `pipeline.measure_cost`). Other `options`:
    `RunSpec.of`'s keywords (``seed``, ``device``, ``json_path``, ``progress``, ...).
    """
    # Recovery stays end-to-end by default, quick or not: block fits alone won on a structured model
    # (width-40) but lost on `paper` in both time and quality (docs/frontier.md, "The quick demo").
    specs = [RunSpec.of(model, recipe, evaluate=True, quick=quick, recover_steps=recover_steps,
                        recover_budget="quick" if quick else "full", **options) for recipe in recipes]
    for spec in specs[1:]:  # every recipe's checks before the first one's work (execute checks its own)
        preflight(spec)
    runs, finals, dense = [], [], None
    for spec in specs:
        if dense is not None:  # the same model on the same windows: scored once
            spec = dataclasses.replace(spec, evaluation=dataclasses.replace(spec.evaluation, dense=dense))
        r = execute(spec)
        e = r.evaluations
        dense = e["dense"]
        runs.append(DemoRun(model, r.prepared.recipe.name, e["dense"], e["compressed"], r.report, e.get("recovered"),
                            r.seconds, None, r.prepared.schedule))
        finals.append(r.model)
        tokenizer = r.tokenizer
    measured = None
    if measure:
        t = time.perf_counter()
        spec = specs[0]
        for run, cost in zip(runs, measure_cost(model, finals, tokenizer, spec.overrides.quick, spec.progress),
                             strict=True):
            run.cost = cost
        measured = time.perf_counter() - t
        if len(runs) == 1:  # one run: its own phase, inside its total
            seconds = runs[0].seconds
            total = seconds.pop("total")
            seconds.update(measure=measured, total=total + measured)
    demo = Demo(runs, measured if len(runs) > 1 else None)
    if specs[0].outputs.json_path:
        write_json(specs[0].outputs.json_path, demo.to_dict())
    return demo
