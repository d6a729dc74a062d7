"""The pre-flight of every run: each check a `RunSpec` can fail, made before the model loads and before
anything is written (the union of what `compress` and `demo` each checked), and what the checks
resolve (the recipe with its overrides, the recovery config, the device) handed to the executor."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from smartprune.compression.engine import check_recipe_for
from smartprune.data import TRAIN_TEXTS, check_positions, eval_text, train_text_path
from smartprune.device import resolve_compute_dtype, resolve_device
from smartprune.errors import ArtifactError, DataError, OutputError, RecipeError, did_you_mean
from smartprune.evaluation.perplexity import check_limit
from smartprune.files import check_free_space, check_output, check_output_file, check_outputs_apart, read_json
from smartprune.hf import config_parameters
from smartprune.methods import STRUCTURED
from smartprune.recipes import Recipe, load_recipe
from smartprune.recipes.schema import (
    RECOVERY_BUDGETS,
    CalibrationConfig,
    OverallConfig,
    RecoverConfig,
    build_section,
    not_standard,
)
from smartprune.runs.spec import RunSpec
from smartprune.storage.format import DTYPES
from smartprune.storage.gguf_writer import check_gguf, check_gguf_shape
from smartprune.storage.sources import model_config, model_reference

RESUME_POINT = "compressed"  # the compressed model before recovery, kept beside the recovery checkpoint
IDENTITY = "run.json"  # the model, recipe and seed that made it
# --quick runs the recipe's stages on a coarser schedule: the recursive strategy's rate in steps of a
# quarter (the paper's 0.05 is 20 fits per matrix), FPP zeroing at least 35% of a matrix per iteration
# (the paper's 10% is 7 iterations to 70%); on SmolLM2 the `paper` compression is most of the demo's time
QUICK_STEP = 0.25
QUICK_FPP_SHARE = 0.35
QUICK_JOINT_POINTS = 1  # a joint allocation's moves each side of the mean (half the default's 2)
QUICK_CALIBRATION = {"samples": 8, "seqlen": 64}
QUICK_LIMIT, LIMIT = 4, 16  # evaluation windows


@dataclass(frozen=True)
class Prepared:
    """What the pre-flight resolved."""

    recipe: Recipe  # with the run's overrides (and the --quick schedule)
    recovery: RecoverConfig | None
    device: torch.device
    config: object | None  # the model's config where it can be read without loading the model
    identity: dict  # model, recipe and seed: what a resumed run must share
    schedule: str = ""  # what --quick changed in the recipe's schedule
    limit: int | None = None  # evaluation windows

    def checkpoints(self, out: Path | None) -> Path | None:
        """Where an interrupted recovery of a run that writes `out` is kept (beside it, never inside a folder
        of the user's); None when the run writes no folder or does not retrain."""
        from smartprune.runs.recover import checkpoint_dir

        return None if out is None or self.recovery is None else checkpoint_dir(out)


def preflight(spec: RunSpec) -> Prepared:
    """Every check of `spec`, before any work; one line (an error of smartprune.errors) for the first
    that fails."""
    o = spec.outputs
    if spec.evaluation is not None:
        check_limit(spec.evaluation.limit)
    for path in (o.out, o.dense_out):
        if path is not None:
            check_output(path, o.overwrite)
    local = Path(spec.model).expanduser()
    local = local if local.exists() else None
    check_outputs_apart(o.out, o.dense_out, local)
    device = resolve_device(spec.compute.device)
    resolve_compute_dtype(spec.compute.compute_dtype, device)
    if spec.compute.offload and device.type == "cpu":  # it would move each block from the CPU to the CPU
        raise DataError("--offload keeps the blocks not being compressed off a GPU; this run is on the CPU, where "
                        "the whole model already is")
    if o.dtype not in DTYPES:
        raise OutputError(f"unknown dtype '{o.dtype}'{did_you_mean(o.dtype, DTYPES)}; known: {', '.join(DTYPES)}")
    recipe, schedule = resolve_recipe(spec)
    recovery = resolve_recovery(spec, recipe)
    _check_data(spec, recipe, recovery)
    config = model_config(spec.model)
    if config is not None:  # a recipe the model's family cannot run fails before the model loads
        check_recipe_for(config, recipe)
        if o.out is not None:
            dense = config_parameters(config) * DTYPES[o.dtype].itemsize  # a compact model holds >= 1/20 of it
            check_free_space(o.out, dense // 20, dense * (2 if o.dense_out else 1), "the compressed model")
    if o.gguf_out is not None:
        check_gguf_export(recipe, config, o.gguf_type, o.gguf_out, o.overwrite, o.out, o.dense_out, local)
    identity = {"model": model_reference(spec.model), "recipe": recipe.to_dict(), "seed": spec.seed}
    limit = None if spec.evaluation is None else \
        spec.evaluation.limit or (QUICK_LIMIT if spec.overrides.quick else LIMIT)
    prepared = Prepared(recipe, recovery, device, config, identity, schedule, limit)
    if spec.resume:
        check_resumable(prepared.checkpoints(o.out), recipe, identity)
    return prepared


def resolve_recipe(spec: RunSpec) -> tuple[Recipe, str]:
    """The recipe with the run's overrides, and what --quick changed in its schedule ('' if nothing)."""
    v = spec.overrides
    recipe = spec.recipe if isinstance(spec.recipe, Recipe) else load_recipe(spec.recipe)
    recipe = with_target(with_calibration(recipe, v.calib_samples, v.calib_seqlen), v.target_compression)
    if not v.quick:
        return recipe, ""
    return quick_schedule(with_calibration(recipe, **QUICK_CALIBRATION))


def resolve_recovery(spec: RunSpec, recipe: Recipe) -> RecoverConfig | None:
    """The recipe's recover section, else the run's named budget; its steps and objective replaced where
    the run says so."""
    r = spec.recovery
    cfg = recipe.recover
    if cfg is None and r.budget is not None:
        cfg = RecoverConfig(**RECOVERY_BUDGETS[r.budget])
    if cfg is not None and r.steps is not None:
        cfg = None if r.steps == 0 else dataclasses.replace(cfg, steps=r.steps, tokens=None, minutes=None)
    if r.objective is not None and cfg is not None:
        try:
            cfg = dataclasses.replace(cfg, objective=r.objective)
        except ValueError as exc:
            raise RecipeError(f"--recover-objective: {exc}") from None
    return cfg


def _check_data(spec: RunSpec, recipe: Recipe, recovery: RecoverConfig | None) -> None:
    """The data files a run reads, before the model loads."""
    train_text_path(recipe.calibration.text)
    if spec.evaluation is not None:
        eval_text("wikitext2")
    if recovery is not None and recovery.text in TRAIN_TEXTS:
        train_text_path(recovery.text)


def with_calibration(recipe: Recipe, samples: int | None = None, seqlen: int | None = None) -> Recipe:
    """`recipe` with its calibration window count / length overridden where given."""
    changes = {k: v for k, v in (("samples", samples), ("seqlen", seqlen)) if v is not None}
    if not changes:
        return recipe
    fields = {**dataclasses.asdict(recipe.calibration), **changes}  # validated as the recipe's own would be
    return recipe.replace(calibration=build_section(CalibrationConfig, fields, "calibration"))


def with_target(recipe: Recipe, target: float | None) -> Recipe:
    """`recipe` with its overall target replaced (it must have an overall section)."""
    if target is None:
        return recipe
    if recipe.overall is None:
        raise RecipeError(f"--target-compression needs a recipe with an overall section (e.g. smart); "
                          f"'{recipe.name}' has fixed rates")
    fields = {**dataclasses.asdict(recipe.overall), "target": target}
    return recipe.replace(overall=build_section(OverallConfig, fields, "--target-compression"))


def quick_schedule(rec: Recipe) -> tuple[Recipe, str]:
    """`rec` on the --quick schedule, and a line saying what changed ('' when nothing did)."""
    changes: dict = {}
    said = []
    if rec.strategy.recursive and rec.strategy.step < QUICK_STEP:
        changes["strategy"] = dataclasses.replace(rec.strategy, step=QUICK_STEP)
        said.append(f"recursive rate steps of {QUICK_STEP:g} (recipe: {rec.strategy.step:g})")
    o = rec.overall
    unstructured = not any(k in STRUCTURED for k in rec.stages)  # a structured allocation measures no moves
    if o is not None and unstructured and o.sensitivity == "joint" and o.points > QUICK_JOINT_POINTS:
        changes["overall"] = dataclasses.replace(o, points=QUICK_JOINT_POINTS)
        said.append(f"joint measurement at the mean +- the spread only (recipe: {o.points} points each side)")
    for name, cfg in rec.stages.items():
        share = getattr(cfg, "p_pos", 0.0) + getattr(cfg, "p_neg", 0.0)
        if 0 < share < QUICK_FPP_SHARE:
            k = QUICK_FPP_SHARE / share
            changes[name] = dataclasses.replace(cfg, p_pos=cfg.p_pos * k, p_neg=cfg.p_neg * k)
            said.append(f"{name} zeroing {QUICK_FPP_SHARE:.0%} per iteration (recipe: {share:.0%})")
    return (rec.replace(**changes), "quick schedule: " + ", ".join(said)) if changes else (rec, "")


def check_windows(model, calib_seqlen: int, recover: RecoverConfig | None, eval_seqlen: int | None = None) -> None:
    """Every window length of a run within the model's positions (known once the model is loaded)."""
    check_positions(model, calib_seqlen, "calibration window length (calib-seqlen)")
    if recover is not None:
        check_positions(model, recover.seqlen, "recovery seqlen")
    if eval_seqlen is not None:
        check_positions(model, eval_seqlen, "evaluation seqlen")


def check_gguf_export(recipe: Recipe, config, gguf_type: str, gguf_out: Path, overwrite: bool, *others) -> None:
    """A GGUF file needs a standard result, a family and type the writer knows, and a free path."""
    why = not_standard(recipe)
    if why:
        raise OutputError(f"--gguf-out: recipe '{recipe.name}': {why}")
    check_gguf(config.model_type if config is not None else "", gguf_type)
    check_gguf_shape(config, stages=recipe.stages)
    check_output_file(gguf_out, overwrite)
    check_outputs_apart(gguf_out, *others)


def check_resumable(folder: Path | None, recipe: Recipe, identity: dict) -> None:
    """`--resume` needs a recover section, a finished compression and a recovery checkpoint of this same
    model, recipe and seed."""
    from smartprune.training.checkpoint import CHECKPOINT

    if recipe.recover is None or folder is None:
        raise RecipeError(f"--resume continues a recipe's recover section; recipe '{recipe.name}' has none")
    if not (folder / IDENTITY).is_file() or not (folder / CHECKPOINT).is_file():
        raise DataError(f"nothing to resume in {folder}: no interrupted recovery of this --out (a run stopped "
                        "during compression starts again: run without --resume)")
    if read_json(folder / IDENTITY, "resume point", ArtifactError) != json.loads(json.dumps(identity)):
        raise DataError(f"the interrupted run in {folder} compressed another model, recipe or seed; resume it "
                        "with the same ones, or run without --resume to start again")
