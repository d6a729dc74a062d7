"""The subcommands: each turns the parsed flags into plain values and calls one
library function; heavy modules are imported inside the command that needs them."""

from __future__ import annotations

import argparse
import sys

from smartprune.errors import DataError


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def cmd_recipes(args: argparse.Namespace) -> int:
    from smartprune.recipes import builtin_recipes
    from smartprune.recipes.schema import OPTIONAL_SECTIONS, SECTION_TYPES, STAGE_TYPES, field_docs

    recipes = builtin_recipes()
    width = max(map(len, recipes))
    for name, recipe in recipes.items():
        _out(f"{name:<{width}}  {recipe.description}")
    if args.fields:
        for key, cls in {**STAGE_TYPES, **SECTION_TYPES, **OPTIONAL_SECTIONS}.items():
            _out(f"\n{key}:")
            for field, default, doc in field_docs(cls):
                _out(f"  {field:<16} default {default!s:<11} {doc}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from smartprune.api import compress_model

    result = compress_model(args.model, args.recipe, out=args.out, dense_out=args.dense_out, seed=args.seed,
                            overwrite=args.overwrite, calib_samples=args.calib_samples,
                            calib_seqlen=args.calib_seqlen, target_compression=args.target_compression,
                            dtype=args.dtype, device=args.device,
                            offload=args.offload, compute_dtype=args.compute_dtype, progress=not args.quiet)
    _out(result.summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from smartprune.api import run_demo

    if args.recover_steps is not None and args.recover_steps < 0:
        raise DataError(f"--recover-steps must be 0 or more, got {args.recover_steps}")
    result = run_demo(model=args.model, recipe=args.recipe, quick=args.quick, limit=args.limit, seed=args.seed,
                      recover_steps=args.recover_steps, device=args.device, json_path=args.json,
                      progress=not args.quiet)
    _out(result.summary())
    return 0


def _eval_settings(args: argparse.Namespace):
    """EvalSettings from whichever option groups the command has (the others keep their defaults)."""
    from smartprune.evaluation.classify import FinetuneConfig
    from smartprune.evaluation.generation import GenerationConfig
    from smartprune.evaluation.suite import EvalSettings

    a = vars(args)
    try:
        finetune = FinetuneConfig(**{k: a[o] for k, o in (("max_train", "max_train"), ("epochs", "epochs"),
                                                          ("seqlen", "ft_seqlen"), ("batch_size", "ft_batch_size"),
                                                          ("lr", "lr"), ("seed", "seed")) if o in a})
        generation = GenerationConfig(**{k: v for k, v in (("prompts", tuple(a.get("prompt") or ())),
                                                           ("lengths", tuple(a.get("lengths") or ())),
                                                           ("greedy", not a.get("sample", False)),
                                                           ("seed", a["seed"])) if v != ()})
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return EvalSettings(**{k: a[k] for k in ("seqlen", "stride", "limit", "examples", "mode") if k in a},
                        finetune=finetune, generation=generation, seed=args.seed)


def cmd_eval(args: argparse.Namespace) -> int:
    from smartprune.api import evaluate_models

    result = evaluate_models(args.models, tasks=args.tasks.split(","), settings=_eval_settings(args),
                             json_path=args.json, device=args.device, compute_dtype=args.compute_dtype,
                             progress=not args.quiet, resident=args.resident)
    _out(result.summary())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from smartprune.api import evaluate_models

    result = evaluate_models(args.models, tasks=["generation"], settings=_eval_settings(args), json_path=args.json,
                             device=args.device, compute_dtype=args.compute_dtype, progress=not args.quiet,
                             resident=args.resident)
    for model, res in result.results.items():
        for prompt, text in res["generation"]["texts"].items():
            _out(f"--- {model} | {res['generation']['decoding']} | {prompt!r}\n{prompt}{text}\n")
    _out(result.summary())
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from smartprune.api import compress_classifier

    s = _eval_settings(args)
    result = compress_classifier(args.model, args.task, args.recipe, finetune=s.finetune, examples=args.examples,
                                 calib_samples=args.calib_samples, seed=args.seed, json_path=args.json,
                                 device=args.device, compute_dtype=args.compute_dtype, progress=not args.quiet)
    _out(result.summary())
    return 0


# recover flags -> RecoverConfig fields (validated by the recipe schema, so ranges and NaN are checked once)
RECOVER_FLAGS = ("text", "steps", "tokens", "minutes", "seqlen", "batch_size", "lr", "weight_decay", "temperature",
                 "kl_weight", "ce_weight", "hidden_weight", "eval_every", "eval_windows", "checkpoint_minutes",
                 "compute_dtype", "sharding")


def cmd_recover(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smartprune.artifact import write_json
    from smartprune.recipes.schema import RecoverConfig, build_section
    from smartprune.recovery_run import recover_model

    given = {k: getattr(args, k) for k in RECOVER_FLAGS if getattr(args, k) is not None}
    given["teacher"] = "none" if args.teacher == "none" else "dense"
    cfg = build_section(RecoverConfig, given, "recover")
    run = recover_model(args.compressed, teacher=args.teacher, out=args.out, cfg=cfg, dense_out=args.dense_out,
                        device=args.device, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                        nproc=args.nproc, progress=not args.quiet)
    if run.rank != 0:
        return 0
    if args.json:
        write_json(Path(args.json), run.to_dict())
    _out(run.summary())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smartprune.bench import BenchSettings, bench, write_outputs

    settings = BenchSettings(repeats=args.repeats, lengths=tuple(args.lengths), threads=args.threads,
                             new_tokens=args.new_tokens, rss=not args.no_rss, batches=tuple(args.batches),
                             device=args.device, compute_dtypes=tuple(args.compute_dtype),
                             residencies=tuple(args.resident), semi_structured=args.semi_structured)
    result = bench(args.models, settings, progress=not args.quiet)
    if args.json:
        write_outputs(result, Path(args.json))
    _out(result.summary())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from smartprune.sweep import SweepSettings, parse_rates, run_sweep, summary

    settings = SweepSettings(model=args.model, method=args.method, rates=parse_rates(args.rates),
                             variants=args.variants.split(",") if args.variants else [""],
                             tasks=args.tasks.split(","), base=args.base, limit=args.limit, examples=args.examples,
                             seqlen=args.seqlen, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                             seed=args.seed, recover_tokens=args.recover_tokens, device=args.device)
    _out(summary(run_sweep(settings, args.json, progress=not args.quiet)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from smartprune.report import write_report

    out = write_report(args.runs, args.out, block=args.block, overwrite=args.overwrite)
    _out(f"report: {out / 'index.html'} (Markdown twin: {out / 'report.md'}, figures in {out / 'figures'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from smartprune.training import TrainConfig, train

    cfg = TrainConfig(config=args.config, text=args.text, steps=args.steps, minutes=args.minutes,
                      batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr, seed=args.seed)
    summary = train(cfg, args.out, overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    t = summary["test"]
    _out(f"trained {cfg.config} ({summary['parameters']:,} parameters) on {cfg.text} for {summary['steps_done']} "
         f"steps in {summary['seconds']:.0f} s: loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, "
         f"test perplexity {t['perplexity']:.2f} (first {t['windows']} windows of {t['seqlen']})\nsaved to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smartprune.compare import CompareSettings, run_compare, write_outputs

    settings = CompareSettings(model=args.model, methods=args.methods.split(","), sparsities=args.sparsity.split(","),
                               tasks=args.tasks.split(","), limit=args.limit, seqlen=args.seqlen,
                               calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                               recover_tokens=args.recover_tokens, device=args.device)
    result = run_compare(settings, progress=not args.quiet)
    if args.json:
        write_outputs(result, Path(args.json))
    _out(result.summary())
    return 0


