"""High-level library calls behind the CLI: each takes plain values and returns a result with
``to_dict()`` (what goes to JSON) and ``summary()`` (what a person reads)."""

from __future__ import annotations

import dataclasses
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smartprune.accounting import format_table
from smartprune.allocation import allocation_table
from smartprune.artifact import DTYPES, check_output, check_outputs_apart, save, write_dense, write_json
from smartprune.data import EVAL_TEXTS, TRAIN_TEXTS, check_positions, eval_text, train_text_path
from smartprune.device import resolve_compute_dtype, resolve_device
from smartprune.engine import check_recipe_for, compress
from smartprune.errors import DataError, OutputError, RecipeError, did_you_mean
from smartprune.evaluation.perplexity import check_limit, perplexity
from smartprune.loading import check_model, load_model, model_config, model_reference
from smartprune.recipes import Recipe, load_recipe
from smartprune.recipes.schema import RecoverConfig

log = logging.getLogger(__name__)


def environment() -> dict:
    """What the numbers were measured on."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor()}


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


def _check_windows(model, calib_seqlen: int, recover: RecoverConfig | None, eval_seqlen: int | None = None) -> None:
    """Every window length of a run within the model's positions, before any of the run's work."""
    check_positions(model, calib_seqlen, "calibration window length (calib-seqlen)")
    if recover is not None:
        check_positions(model, recover.seqlen, "recovery seqlen")
    if eval_seqlen is not None:
        check_positions(model, eval_seqlen, "evaluation seqlen")


def _stage_seconds(report: dict) -> dict[str, float]:
    return {k: v["seconds"] for k, v in report["stages"].items()}


@dataclass
class CompressRun:
    report: dict
    out: Path
    dense_out: Path | None

    def summary(self) -> str:
        r = self.report
        lines = [f"compressed {r['model']} with recipe '{r['recipe']}' in {r['seconds']:.0f} s "
                 f"(overall compression {100 * r['overall']['compression']:.2f}%)", "",
                 format_table(r, _stage_seconds(r)), "", f"compressed model: {self.out}"]
        if "allocation" in r:
            lines[3:3] = ["", allocation_table(r["allocation"])]
        if self.dense_out:
            lines.append(f"dense Hugging Face folder: {self.dense_out}")
        if "recovery" in r:
            rec = r["recovery"]
            lines.insert(1, f"recovered for {rec['steps']} steps ({rec['tokens']:,} tokens, {rec['seconds']:.0f} s): "
                         f"held-out perplexity {rec['perplexity_before']:,.2f} -> {rec['perplexity_after']:,.2f}")
        return "\n".join(lines)


def compress_model(model: str, recipe: str | Path | Recipe, *, out: str | Path, dense_out: str | Path | None = None,
                   seed: int = 0, overwrite: bool = False, calib_samples: int | None = None,
                   calib_seqlen: int | None = None, target_compression: float | None = None, dtype: str = "float32",
                   device: str = "auto", offload: bool | None = None, compute_dtype: str = "auto",
                   progress: bool = True) -> CompressRun:
    """Load MODEL, compress it with `recipe` on `device` (then retrain it when the recipe has a
    ``recover`` section), write it to `out` (and a dense HF folder to `dense_out`). ``offload``
    keeps one block at a time on the device (``None``: when the model would not fit)."""
    from smartprune.recovery import recover
    from smartprune.recovery_run import checkpoint_dir, snapshot_teacher

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
    loaded = load_model(model)
    _check_windows(loaded.model, recipe.calibration.seqlen, recipe.recover)
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
    if recipe.recover is not None:  # the model is written: its recovery checkpoint is no longer needed
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    return CompressRun(report, out, Path(dense_out) if dense_out else None)


# Recovery in the demo when the recipe has none of its own: a budget that fits the demo's time on two CPU
# cores (README: measured numbers), distillation from the dense model.
DEMO_RECOVERY = {"full": {"steps": 120, "seqlen": 256, "batch_size": 4, "lr": 1e-3, "eval_every": 40},
                 "quick": {"steps": 16, "seqlen": 128, "batch_size": 4, "lr": 1e-3, "eval_every": 8}}


@dataclass
class DemoRun:
    model: str
    recipe: str
    dense: dict
    compressed: dict
    report: dict
    recovered: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        d, c, r = self.dense, self.compressed, self.recovered
        s = self.seconds
        rows = [("dense", d), ("compressed", c)] + ([("compressed + recovered", r)] if r else [])
        lines = [f"{self.model}, recipe '{self.recipe}'", "",
                 f"WikiText-2 test perplexity, first {d['windows']} windows of {d['seqlen']} tokens "
                 f"({d['tokens']:,} scored tokens):", "", "| model | perplexity |", "|---|---:|"]
        for name, res in rows:
            ratio = "" if res is d else f" ({res['perplexity'] / d['perplexity']:,.2f}x dense)"
            lines.append(f"| {name} | {res['perplexity']:,.2f}{ratio} |")
        lines += ["", format_table(self.report, _stage_seconds(self.report)), ""]
        if r:
            rec = self.report["recovery"]
            lines += [f"recovery: {rec['steps']} steps of {rec['config']['batch_size']} x {rec['config']['seqlen']} "
                      f"tokens ({rec['tokens']:,} tokens of {rec['text']} train, teacher: the dense model), "
                      f"structure kept: {'yes' if rec['structure']['kept'] else 'NO'}", ""]
        times = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in s.items())
        return "\n".join([*lines, f"time: {times}"])


def run_demo(model: str = "smollm2-135m", recipe: str | Path = "paper", *, quick: bool = False,
             limit: int | None = None, seed: int = 0, seqlen: int = 1024, recover_steps: int | None = None,
             device: str = "auto", json_path: str | Path | None = None, progress: bool = True) -> DemoRun:
    """The main job: perplexity of MODEL before and after compressing it with `recipe`, and after
    retraining the compressed model (distillation from the dense one; ``recover_steps=0`` skips it).

    Default subset: the first 16 windows of 1024 tokens of the WikiText-2 test text. ``quick``
    uses 4 evaluation windows, 8 calibration windows of 64 tokens and a shorter recovery.
    """
    from smartprune.recovery import recover
    from smartprune.recovery_run import snapshot_teacher

    check_limit(limit)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    rec = load_recipe(recipe)
    if quick:
        rec = with_calibration(rec, samples=8, seqlen=64)
    recovery_cfg = rec.recover or RecoverConfig(**DEMO_RECOVERY["quick" if quick else "full"])
    if recover_steps is not None:
        recovery_cfg = None if recover_steps == 0 else dataclasses.replace(recovery_cfg, steps=recover_steps,
                                                                           tokens=None, minutes=None)
    limit = limit or (4 if quick else 16)
    train_text_path(rec.calibration.text)
    eval_text("wikitext2")  # the data files are checked before the model loads
    if recovery_cfg is not None and recovery_cfg.text in TRAIN_TEXTS:
        train_text_path(recovery_cfg.text)
    loaded = load_model(model)
    _check_windows(loaded.model, rec.calibration.seqlen, recovery_cfg, seqlen)
    seconds = {"load": time.perf_counter() - t0}

    def evaluate(name: str) -> dict:
        t = time.perf_counter()
        loaded.model.to(dev)
        result = perplexity(loaded.model, loaded.tokenizer, "wikitext2", seqlen=seqlen, limit=limit,
                            progress=progress).to_dict()
        seconds[f"{name} eval"] = time.perf_counter() - t
        return result

    dense = evaluate("dense")
    loaded.model.to("cpu")
    teacher = snapshot_teacher(loaded.model, recovery_cfg)
    t = time.perf_counter()
    result = compress(loaded.model, loaded.tokenizer, rec, seed=seed, progress=progress, device=dev)
    seconds["compress"] = time.perf_counter() - t
    after = evaluate("compressed")
    report = {**result.report, "environment": environment()}
    recovered = None
    if recovery_cfg is not None:
        t = time.perf_counter()
        report["recovery"] = recover(loaded.model, loaded.tokenizer, recovery_cfg, teacher=teacher, device=dev,
                                     seed=seed, progress=progress)
        seconds["recover"] = time.perf_counter() - t
        recovered = evaluate("recovered")
    seconds["total"] = time.perf_counter() - t0
    run = DemoRun(model, rec.name, dense, after, report, recovered, seconds)
    if json_path:
        write_json(Path(json_path), run.to_dict())
    return run


def _cell(value: float, base: float | None) -> str:
    text = f"{value:,.4f}" if abs(value) < 10 else f"{value:,.2f}"
    if base is None:
        return text
    delta = value - base
    return text + (f" ({delta:+,.4f})" if abs(delta) < 10 else f" ({delta:+,.2f})")


@dataclass
class EvalTable:
    """Results of several models on the same tasks; the first model is the reference column."""

    models: list[str]
    results: dict[str, dict[str, dict]]  # model -> task -> result
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        first = self.models[0]
        return {"results": self.results[first], "models": self.models, "by_model": self.results,
                "settings": self.settings, "environment": environment()}

    def summary(self) -> str:
        from smartprune.evaluation.suite import shown_metrics

        first = self.results[self.models[0]]
        head = "| task | metric | " + " | ".join(self.models) + " |"
        lines = [head, "|---|---|" + "---:|" * len(self.models)]
        for task, res in first.items():
            if res.get("available") is False:
                lines.append(f"| {task} | not available | {res['reason']} |" + " |" * (len(self.models) - 1))
                continue
            for metric in shown_metrics(task, res):
                cells = [_cell(self.results[m][task][metric], None if i == 0 else res[metric])
                         for i, m in enumerate(self.models)]
                lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate_models(models: list[str], *, tasks: list[str], settings=None, json_path: str | Path | None = None,
                    device: str = "auto", compute_dtype: str = "auto", progress: bool = True,
                    resident: str = "dense") -> EvalTable:
    """Every task on every model (loaded one at a time), side by side with the first model, on
    `device` with forward passes in `compute_dtype` (``auto``: bfloat16 on a GPU, float32 on a CPU);
    compressed folders held `resident` "dense" (fastest) or "compact" (smallest, inference only)."""
    from smartprune.device import autocast, resolve_compute_dtype
    from smartprune.evaluation.suite import EvalSettings, check_tasks, evaluate

    dev = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, dev)
    settings = settings or EvalSettings()
    tasks = check_tasks(tasks)
    if resident == "compact" and settings.mode == "finetune":
        raise DataError("--resident compact holds models for inference only; fine-tuned classification needs "
                        "--resident dense")
    for t in tasks:  # missing perplexity texts fail before any model loads
        if t in EVAL_TEXTS:
            eval_text(t)
    for spec in models:  # and so does a bad second model
        check_model(spec)
    results: dict[str, dict[str, dict]] = {}
    for spec in models:
        loaded = load_model(spec, resident=resident)
        if loaded.tokenizer is None:
            raise DataError(f"model {spec} has no tokenizer files; evaluation needs one")
        log.info("evaluating %s on %s (%s, %s)", spec, ", ".join(tasks), dev, str(dtype).removeprefix("torch."))
        loaded.model.to(dev)
        with autocast(dev, dtype):
            results[spec] = evaluate(loaded, tasks, settings, progress=progress)
        del loaded
    table = EvalTable(list(models), results,
                      {**dataclasses.asdict(settings), "device": str(dev), "compute_dtype": str(dtype)[6:]})
    if json_path:
        write_json(Path(json_path), table.to_dict())
    return table


@dataclass
class ClassifierRun:
    """A fine-tuned classifier before and after compression (the paper's Table 6 setting)."""

    model: str
    task: str
    recipe: str
    dense: dict
    compressed: dict
    training: dict
    report: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "results": {self.task: self.compressed}, "environment": environment()}

    def summary(self) -> str:
        lines = [f"{self.model} fine-tuned on {self.task} ({self.training['examples']} examples, "
                 f"{self.training['steps']} steps), compressed with '{self.recipe}' "
                 f"({100 * self.report['overall']['compression']:.2f}%)", "",
                 "| metric | fine-tuned | compressed |", "|---|---:|---:|"]
        for m in ("accuracy", "precision", "recall", "f1_weighted", "loss", "mcc", "f1"):
            if m in self.dense:
                lines.append(f"| {m} | {_cell(self.dense[m], None)} | {_cell(self.compressed[m], self.dense[m])} |")
        s = self.seconds
        lines += ["", f"time: fine-tune {s['finetune']:.0f} s, compress {s['compress']:.0f} s, "
                  f"evaluation {s['evaluate']:.0f} s"]
        return "\n".join(lines)


def compress_classifier(model: str, task: str, recipe: str | Path | Recipe, *, finetune=None,
                        examples: int | None = None, calib_samples: int = 64, seed: int = 0,
                        json_path: str | Path | None = None, device: str = "auto", compute_dtype: str = "auto",
                        progress: bool = True) -> ClassifierRun:
    """Fine-tune MODEL on `task`, score its dev split, compress it with `recipe` (stages with
    ``objective: task`` fit the classification loss), and score it again. Fine-tuning and scoring
    run on `device` in `compute_dtype`; the compression itself runs on the CPU."""
    from smartprune.device import autocast, resolve_compute_dtype
    from smartprune.evaluation import classify
    from smartprune.evaluation.tasks import NotAvailable, get_task, load_split, subsample

    where = resolve_device(device)
    dtype = resolve_compute_dtype(compute_dtype, where)
    cfg = finetune or classify.FinetuneConfig(seed=seed)
    spec = get_task(task)
    try:
        train, dev = load_split(spec, "train", seed), subsample(load_split(spec, "dev", seed), examples, seed)
    except NotAvailable as exc:
        raise DataError(f"task {task} cannot be fine-tuned here: {exc}") from None
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    loaded = load_model(model)
    clf = classify.SequenceClassifier(loaded.model.to(where), len(spec.labels), seed=cfg.seed)
    seconds = {}
    t = time.perf_counter()
    with autocast(where, dtype):
        training = classify.finetune(clf, loaded.tokenizer, spec, subsample(train, cfg.max_train, cfg.seed), cfg,
                                     progress=progress)
    seconds["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    with autocast(where, dtype):
        dense = classify.evaluate_classifier(clf, loaded.tokenizer, spec, dev, seqlen=cfg.seqlen, progress=progress)
    seconds["evaluate"] = time.perf_counter() - t
    clf.to("cpu")  # the compression engine runs on the CPU
    calib_examples = subsample(train, calib_samples + rec.calibration.eval_samples, seed + 1)
    calib, objective = classify.task_calibration(clf, loaded.tokenizer, spec, calib_examples[:calib_samples],
                                                 calib_examples[calib_samples:], cfg.seqlen)
    clf.head.requires_grad_(False)
    t = time.perf_counter()
    result = compress(loaded.model, loaded.tokenizer, rec, seed=seed, calib=calib, task_objective=objective,
                      progress=progress)
    seconds["compress"] = time.perf_counter() - t
    t = time.perf_counter()
    clf.to(where)
    with autocast(where, dtype):
        after = classify.evaluate_classifier(clf, loaded.tokenizer, spec, dev, seqlen=cfg.seqlen, progress=progress)
    seconds["evaluate"] += time.perf_counter() - t
    clf.to("cpu")
    training = {**training, "budget": cfg.to_dict(), "device": str(where),
                "compute_dtype": str(dtype).removeprefix("torch.")}
    run = ClassifierRun(model, task, rec.name, dense, after, training, result.report, seconds)
    if json_path:
        write_json(Path(json_path), run.to_dict())
    return run
