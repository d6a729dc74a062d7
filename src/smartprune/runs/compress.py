"""`smartprune compress`: load a model, compress it with a recipe (and its recover section, if any),
write the compressed folder (and a plain Hugging Face folder with ``dense_out``), and report what it
cost and removed. Also the recipe overrides (calibration, target) the other runs share."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from smartprune.compression.accounting import format_table
from smartprune.compression.allocation import allocation_table
from smartprune.compression.engine import check_recipe_for, compress
from smartprune.data import check_positions, train_text_path
from smartprune.device import resolve_compute_dtype, resolve_device
from smartprune.errors import OutputError, RecipeError, did_you_mean
from smartprune.files import check_output, check_output_file, check_outputs_apart
from smartprune.recipes import Recipe, load_recipe
from smartprune.recipes.schema import RecoverConfig, not_standard
from smartprune.runs.environment import environment
from smartprune.storage.format import DTYPES
from smartprune.storage.gguf_writer import check_gguf, check_gguf_shape, write_gguf
from smartprune.storage.save import plain_model, save, write_dense
from smartprune.storage.sources import load_model, model_config, model_reference

log = logging.getLogger(__name__)




def with_calibration(recipe: Recipe, samples: int | None = None, seqlen: int | None = None) -> Recipe:
    """`recipe` with its calibration window count / length overridden where given."""
    changes = {k: v for k, v in (("samples", samples), ("seqlen", seqlen)) if v is not None}
    if not changes:
        return recipe
    return recipe.replace(calibration=dataclasses.replace(recipe.calibration, **changes))


def with_target(recipe: Recipe, target: float | None) -> Recipe:
    """`recipe` with its overall target replaced (it must have an overall section)."""
    from smartprune.recipes.schema import OverallConfig, build_section

    if target is None:
        return recipe
    if recipe.overall is None:
        raise RecipeError(f"--target-compression needs a recipe with an overall section (e.g. smart); "
                          f"'{recipe.name}' has fixed rates")
    fields = {**dataclasses.asdict(recipe.overall), "target": target}
    return recipe.replace(overall=build_section(OverallConfig, fields, "--target-compression"))


def check_windows(model, calib_seqlen: int, recover: RecoverConfig | None, eval_seqlen: int | None = None) -> None:
    """Every window length of a run within the model's positions, before any of the run's work."""
    check_positions(model, calib_seqlen, "calibration window length (calib-seqlen)")
    if recover is not None:
        check_positions(model, recover.seqlen, "recovery seqlen")
    if eval_seqlen is not None:
        check_positions(model, eval_seqlen, "evaluation seqlen")


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
                 format_table(r, stage_seconds(r)), "", f"compressed model: {self.out}"]
        if "allocation" in r:
            lines[3:3] = ["", allocation_table(r["allocation"])]
        if self.dense_out:
            lines.append(f"dense Hugging Face folder: {self.dense_out}")
        if self.gguf_out:
            lines.append(f"GGUF file: {self.gguf_out}")
        if "recovery" in r:
            rec = r["recovery"]
            lines.insert(1, f"recovered for {rec['steps']} steps ({rec['tokens']:,} tokens, {rec['seconds']:.0f} s): "
                         f"held-out perplexity {rec['perplexity_before']:,.2f} -> {rec['perplexity_after']:,.2f}")
        return "\n".join(lines)


def compress_model(model: str, recipe: str | Path | Recipe, *, out: str | Path, dense_out: str | Path | None = None,
                   seed: int = 0, overwrite: bool = False, calib_samples: int | None = None,
                   calib_seqlen: int | None = None, target_compression: float | None = None, dtype: str = "float32",
                   device: str | torch.device = "auto", offload: bool | None = None, compute_dtype: str = "auto",
                   gguf_out: str | Path | None = None, gguf_type: str = "f16", progress: bool = True) -> CompressRun:
    """Load MODEL, compress it with `recipe` on `device` (then retrain it when the recipe has a
    ``recover`` section), write it to `out` (and a dense HF folder to `dense_out`, a GGUF file to
    `gguf_out` for a recipe whose result is a standard model). ``offload`` keeps one block at a time
    on the device (``None``: when the model would not fit)."""
    from smartprune.runs.recover import checkpoint_dir, snapshot_teacher
    from smartprune.training.recover import recover

    out = Path(out)
    check_output(out, overwrite)
    local = Path(model).expanduser()
    check_outputs_apart(out, dense_out, local if local.exists() else None)
    resolve_compute_dtype(compute_dtype, resolve_device(device))
    if dtype not in DTYPES:
        raise OutputError(f"unknown dtype '{dtype}'{did_you_mean(dtype, DTYPES)}; known: {', '.join(DTYPES)}")
    if dense_out is not None:
        check_output(Path(dense_out), overwrite)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    recipe = with_target(with_calibration(recipe, calib_samples, calib_seqlen), target_compression)
    train_text_path(recipe.calibration.text)  # missing data fails before the model loads
    config = model_config(model)
    if config is not None:  # a recipe the model's family cannot run fails before the model loads
        check_recipe_for(config, recipe)
    if gguf_out is not None:
        check_gguf_export(recipe, config, gguf_type, Path(gguf_out), overwrite, out, dense_out, local)
    loaded = load_model(model)
    check_windows(loaded.model, recipe.calibration.seqlen, recipe.recover)
    teacher = snapshot_teacher(loaded.model, recipe.recover)
    result = compress(loaded.model, loaded.tokenizer, recipe, seed=seed, progress=progress, device=device,
                      offload=offload, compute_dtype=compute_dtype)
    report = {"model": model_reference(model), "source": loaded.source, **result.report, "environment": environment()}
    if recipe.recover is not None:
        report["recovery"] = recover(loaded.model, loaded.tokenizer, recipe.recover, teacher=teacher, device=device,
                                     seed=seed, checkpoint_dir=checkpoint_dir(out), progress=progress)
        loaded.model.to("cpu")
    save(loaded.model, out, tokenizer=loaded.tokenizer, report=report, overwrite=overwrite, dtype=dtype)
    if dense_out is not None:
        write_dense(loaded.model, dense_out, tokenizer=loaded.tokenizer, overwrite=overwrite)
    if gguf_out is not None:
        write_gguf(plain_model(loaded.model), gguf_out, tokenizer=loaded.tokenizer, gguf_type=gguf_type)
    if recipe.recover is not None:  # the model is written: its recovery checkpoint is no longer needed
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    return CompressRun(report, out, Path(dense_out) if dense_out else None, Path(gguf_out) if gguf_out else None)


def check_gguf_export(recipe: Recipe, config, gguf_type: str, gguf_out: Path, overwrite: bool, *others) -> None:
    """A GGUF file needs a standard result, a family and type the writer knows, and a free path."""
    why = not_standard(recipe)
    if why:
        raise OutputError(f"--gguf-out: recipe '{recipe.name}': {why}")
    check_gguf(config.model_type if config is not None else "", gguf_type)
    check_gguf_shape(config, stages=recipe.stages)
    check_output_file(gguf_out, overwrite)
    check_outputs_apart(gguf_out, *others)
