"""`smartprune compress`: load a model, compress it with a recipe (and its recover section, if any),
write the compressed folder (and a plain Hugging Face folder with ``dense_out``, a GGUF file with
``gguf_out``), and report what it cost and removed. A specification of the one run pipeline
(runs/spec.py, runs/preflight.py, runs/pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smartprune.compression.accounting import format_table
from smartprune.compression.allocation import allocation_table
from smartprune.recipes import Recipe
from smartprune.runs.bench import what_you_got
from smartprune.runs.pipeline import execute
from smartprune.runs.spec import RunSpec


def stage_seconds(report: dict) -> dict[str, float]:
    return {k: v["seconds"] for k, v in report["stages"].items()}


@dataclass
class CompressRun:
    report: dict
    out: Path
    dense_out: Path | None
    gguf_out: Path | None = None

    def summary(self) -> str:
        r = self.report
        lines = [f"compressed {r['model']} with recipe '{r['recipe']}' in {r['seconds']:.0f} s "
                 f"(overall compression {100 * r['overall']['compression']:.2f}%)", "",
                 format_table(r, stage_seconds(r), r.get("seconds")), "", f"compressed model: {self.out}"]
        if "allocation" in r:
            lines[3:3] = ["", allocation_table(r["allocation"])]
        if self.dense_out:
            lines.append(f"dense Hugging Face folder: {self.dense_out}")
        if self.gguf_out:
            lines.append(f"GGUF file: {self.gguf_out}")
        lines += what_you_got(r, self.out, r["model"], self.gguf_out)
        if "recovery" in r:
            rec = r["recovery"]
            lines.insert(1, f"recovered for {rec['steps']} steps ({rec['tokens']:,} tokens, {rec['seconds']:.0f} s): "
                         f"held-out perplexity {rec['perplexity_before']:,.2f} -> {rec['perplexity_after']:,.2f}")
        return "\n".join(lines)


def compress_model(model: str, recipe: str | Path | Recipe, *, out: str | Path, **options) -> CompressRun:
    """Load MODEL, compress it with `recipe` (then retrain it when the recipe has a ``recover``
    section) and write it to `out`. `options` are `RunSpec.of`'s keywords: ``dense_out`` (a plain HF
    folder), ``gguf_out`` / ``gguf_type`` (a GGUF file, for a recipe whose result is a standard model),
    ``dtype``, ``overwrite``; ``device``, ``offload`` (one block at a time on the device; None: when the
    model would not fit), ``compute_dtype``; ``calib_samples``, ``calib_seqlen``, ``target_compression``;
    ``seed``, ``resume`` (continue an interrupted recovery from its checkpoint, without compressing
    again), ``progress``."""
    spec = RunSpec.of(model, recipe, out=out, **options)
    result = execute(spec)
    o = spec.outputs
    return CompressRun(result.report, o.out, o.dense_out, o.gguf_out)
