"""`smartprune compress`: load a model, compress it with a recipe (and its recover section, if any),
write the compressed folder (and a plain Hugging Face folder with ``dense_out``), and report what it
cost and removed. Also the recipe overrides (calibration, target) the other runs share."""

from __future__ import annotations

import dataclasses
import json
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
from smartprune.errors import ArtifactError, DataError, OutputError, RecipeError, did_you_mean
from smartprune.files import (
    check_free_space,
    check_output,
    check_output_file,
    check_outputs_apart,
    read_json,
    write_json,
)
from smartprune.hf import config_parameters
from smartprune.recipes import Recipe, load_recipe
from smartprune.recipes.schema import RecoverConfig, not_standard
from smartprune.runs.bench import what_you_got
from smartprune.runs.environment import environment
from smartprune.storage.format import DTYPES
from smartprune.storage.gguf_writer import check_gguf, check_gguf_shape, check_tokenizer, write_gguf
from smartprune.storage.load import load
from smartprune.storage.save import plain_model, save, write_dense
from smartprune.storage.sources import load_model, model_config, model_reference

log = logging.getLogger(__name__)




def with_calibration(recipe: Recipe, samples: int | None = None, seqlen: int | None = None) -> Recipe:
    """`recipe` with its calibration window count / length overridden where given."""
    from smartprune.recipes.schema import CalibrationConfig, build_section

    changes = {k: v for k, v in (("samples", samples), ("seqlen", seqlen)) if v is not None}
    if not changes:
        return recipe
    fields = {**dataclasses.asdict(recipe.calibration), **changes}  # validated as the recipe's own would be
    return recipe.replace(calibration=build_section(CalibrationConfig, fields, "calibration"))


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


def compress_model(model: str, recipe: str | Path | Recipe, *, out: str | Path, dense_out: str | Path | None = None,
                   seed: int = 0, overwrite: bool = False, calib_samples: int | None = None,
                   calib_seqlen: int | None = None, target_compression: float | None = None, dtype: str = "float32",
                   device: str | torch.device = "auto", offload: bool | None = None, compute_dtype: str = "auto",
                   gguf_out: str | Path | None = None, gguf_type: str = "f16", resume: bool = False,
                   progress: bool = True) -> CompressRun:
    """Load MODEL, compress it with `recipe` on `device` (then retrain it when the recipe has a
    ``recover`` section), write it to `out` (and a dense HF folder to `dense_out`, a GGUF file to
    `gguf_out` for a recipe whose result is a standard model). ``offload`` keeps one block at a time
    on the device (``None``: when the model would not fit). ``resume`` continues an interrupted
    recovery (the recipe's recover section) from its checkpoint, without compressing again."""
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
        dense = config_parameters(config) * DTYPES[dtype].itemsize  # a compact model holds at least 1/20 of it
        check_free_space(out, dense // 20, dense * (2 if dense_out else 1), "the compressed model")
    if gguf_out is not None:
        check_gguf_export(recipe, config, gguf_type, Path(gguf_out), overwrite, out, dense_out, local)
    resume_from = checkpoint_dir(out)
    identity = {"model": model_reference(model), "recipe": recipe.to_dict(), "seed": seed}
    if resume:
        check_resumable(resume_from, recipe, identity)
    loaded = load_model(model)
    if gguf_out is not None:  # the tokenizer is known once loaded: refused before the compression
        check_tokenizer(loaded.tokenizer)
    if resume:  # the compressed model kept before its recovery, retrained from the checkpoint on
        report = read_json(resume_from / RESUME_POINT / "report.json", "report", ArtifactError)
        student = load(resume_from / RESUME_POINT, structured=False)
        teacher = None if recipe.recover.teacher == "none" else loaded.model
    else:
        check_windows(loaded.model, recipe.calibration.seqlen, recipe.recover)
        teacher = snapshot_teacher(loaded.model, recipe.recover)
        result = compress(loaded.model, loaded.tokenizer, recipe, seed=seed, progress=progress, device=device,
                          offload=offload, compute_dtype=compute_dtype)
        report = {"model": model_reference(model), "source": loaded.source, **result.report,
                  "environment": environment()}
        student = loaded.model
        if recipe.recover is not None:
            keep_resume_point(student, loaded.tokenizer, report, resume_from, identity)
    if recipe.recover is not None:
        report["recovery"] = recover(student, loaded.tokenizer, recipe.recover, teacher=teacher, device=device,
                                     seed=seed, checkpoint_dir=resume_from, resume=resume, progress=progress)
        student.to("cpu")
    save(student, out, tokenizer=loaded.tokenizer, report=report, overwrite=overwrite, dtype=dtype)
    if dense_out is not None:
        write_dense(student, dense_out, tokenizer=loaded.tokenizer, overwrite=overwrite)
    if gguf_out is not None:
        write_gguf(plain_model(student), gguf_out, tokenizer=loaded.tokenizer, gguf_type=gguf_type,
                   name=export_name(model, recipe.name))
    if recipe.recover is not None:  # the model is written: its recovery checkpoint is no longer needed
        shutil.rmtree(resume_from, ignore_errors=True)
    return CompressRun(report, out, Path(dense_out) if dense_out else None, Path(gguf_out) if gguf_out else None)


RESUME_POINT = "compressed"  # the compressed model before recovery, kept beside the recovery checkpoint
IDENTITY = "run.json"  # the model, recipe and seed that made it


def keep_resume_point(model, tokenizer, report: dict, folder: Path, identity: dict) -> None:
    """Keep the just-compressed model beside the recovery checkpoint: `compress --resume` retrains it
    from the checkpoint instead of compressing again (the structure must exist before the weights load)."""
    shutil.rmtree(folder, ignore_errors=True)  # ours (a hidden sibling of --out): an older run's leftovers
    save(model, folder / RESUME_POINT, tokenizer=tokenizer, report=report)
    write_json(folder / IDENTITY, identity)


def check_resumable(folder: Path, recipe: Recipe, identity: dict) -> None:
    """`compress --resume` needs a recover section, a finished compression and a recovery checkpoint
    of this same model, recipe and seed."""
    from smartprune.training.checkpoint import CHECKPOINT

    if recipe.recover is None:
        raise RecipeError(f"--resume continues a recipe's recover section; recipe '{recipe.name}' has none")
    if not (folder / IDENTITY).is_file() or not (folder / CHECKPOINT).is_file():
        raise DataError(f"nothing to resume in {folder}: no interrupted recovery of this --out (a run stopped "
                        "during compression starts again: run without --resume)")
    if read_json(folder / IDENTITY, "resume point", ArtifactError) != json.loads(json.dumps(identity)):
        raise DataError(f"the interrupted run in {folder} compressed another model, recipe or seed; resume it "
                        "with the same ones, or run without --resume to start again")


def export_name(model: str, recipe: str) -> str:
    """The GGUF file's ``general.name``: the model as the user named it (a folder's or file's name, a hub
    id's last part, a built-in name) and the recipe; never a local path."""
    ref = Path(model).expanduser()
    return f"{ref.stem if ref.suffix == '.gguf' else ref.name}-{Path(recipe).stem}"


def check_gguf_export(recipe: Recipe, config, gguf_type: str, gguf_out: Path, overwrite: bool, *others) -> None:
    """A GGUF file needs a standard result, a family and type the writer knows, and a free path."""
    why = not_standard(recipe)
    if why:
        raise OutputError(f"--gguf-out: recipe '{recipe.name}': {why}")
    check_gguf(config.model_type if config is not None else "", gguf_type)
    check_gguf_shape(config, stages=recipe.stages)
    check_output_file(gguf_out, overwrite)
    check_outputs_apart(gguf_out, *others)
