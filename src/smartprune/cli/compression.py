"""Commands that make models: recipes, compress, demo, recover, train.

Each command is its parser (``add_*``) beside what it runs (``cmd_*``); heavy modules are imported
inside the command, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import os

from smartprune.cli.shared import (
    MODEL_HELP,
    compute_dtype,
    config_flags,
    device,
    flag_name,
    json_out,
    overwrite,
    positive,
    renamed,
    say,
    seed,
    window,
)
from smartprune.errors import DataError
from smartprune.recipes.sections import OBJECTIVES, RECOVERY_BUDGETS, RecoverConfig


def add_recipes(sub) -> None:
    r = sub.add_parser("recipes", help="list the built-in recipes", description="List the built-in recipes, "
                       "one line each; --fields also lists every recipe field with its default.")
    r.add_argument("--fields", action="store_true", help="also list each stage's fields and defaults")
    r.set_defaults(func=cmd_recipes)


def cmd_recipes(args: argparse.Namespace) -> int:
    from smartprune.recipes import builtin_recipes
    from smartprune.recipes.schema import OPTIONAL_SECTIONS, SECTION_TYPES, STAGE_TYPES, field_docs

    recipes = builtin_recipes()
    width = max(map(len, recipes))
    for name, recipe in recipes.items():
        say(f"{name:<{width}}  {recipe.description}")
    if args.fields:
        for key, cls in {**STAGE_TYPES, **SECTION_TYPES, **OPTIONAL_SECTIONS}.items():
            say(f"\n{key}:")
            for field, default, doc in field_docs(cls):
                say(f"  {field:<16} default {default!s:<11} {doc}")
    return 0


def add_compress(sub) -> None:
    c = sub.add_parser("compress", help="compress a model with a recipe",
                       description="Compress MODEL with a recipe and write the compressed model (loadable with "
                       "smartprune.load) and report.json to --out.")
    c.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    c.add_argument("--recipe", required=True, help="a built-in recipe name (see `smartprune recipes`) or a "
                   ".yaml/.json file")
    c.add_argument("--out", required=True, help="folder for the compressed model and report.json")
    c.add_argument("--dense-out", help="also write a plain Hugging Face folder with the compressed weights "
                   "materialized (vanilla from_pretrained loads it; after structured stages a smaller standard "
                   "architecture)")
    gguf_flags(c, "the model")
    seed(c, "seed for calibration windows and random choices")
    c.add_argument("--calib-samples", type=positive, help="override the recipe's calibration window count")
    c.add_argument("--calib-seqlen", type=window, help="override the recipe's calibration window length")
    c.add_argument("--target-compression", type=float, help="the overall compression to reach exactly, for a recipe "
                   "with an overall section (e.g. smart): rates per group and layer chosen by measured sensitivity")
    c.add_argument("--dtype", default="float32", help="stored value precision in --out: float32 (default), float16, "
                   "bfloat16, or int8 (every weight matrix's surviving values as 8-bit integers with one scale per "
                   "output channel; norms, biases and IRC vectors float32)")
    device(c, "where compression (and a recipe's recover section) runs: auto "
                   "(a GPU when torch sees one), cpu, cuda or cuda:N")
    compute_dtype(c, "the calibration forward passes and fits (statistics and Hessians accumulate in float64 "
                  "whatever it is)")
    c.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the block being compressed on the GPU, the others in host memory (default: when "
                   "the model would not fit the GPU's free memory); needs objectives local to each sublayer")
    c.add_argument("--resume", action="store_true", help="continue a recipe's recover section that was stopped "
                   "(Ctrl-C, SIGTERM): the compressed model and the recovery checkpoint kept beside --out are "
                   "retrained from where they stopped, without compressing again (same MODEL, recipe and seed)")
    overwrite(c)
    c.set_defaults(func=cmd_compress)


def gguf_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--gguf-out", help=f"also write {what} as a GGUF file (llama.cpp, transformers' GGUF "
                        "loader): for recipes whose result is a standard architecture (depth, attn_heads, "
                        "ff_neurons); llama, qwen3 and gemma3_text; the metadata llama.cpp's own converter writes "
                        "(tests compare)")
    parser.add_argument("--gguf-type", help="GGUF tensor type: f32, f16 (default), bf16, q8_0, or q4_0 "
                        "(the token table at q8_0); k-quants: write f16, then llama.cpp's llama-quantize")


def gguf_type(args: argparse.Namespace) -> str:
    """--gguf-type's value; alone (without --gguf-out) it would do nothing, so it is refused."""
    if args.gguf_type is not None and args.gguf_out is None:
        raise DataError("--gguf-type sets the type of the --gguf-out file; give --gguf-out FILE too (or leave "
                        "--gguf-type out)")
    return args.gguf_type or "f16"


def cmd_compress(args: argparse.Namespace) -> int:
    from smartprune.runs.compress import compress_model

    kind = gguf_type(args)
    result = compress_model(args.model, args.recipe, out=args.out, dense_out=args.dense_out, seed=args.seed,
                            overwrite=args.overwrite, calib_samples=args.calib_samples,
                            calib_seqlen=args.calib_seqlen, target_compression=args.target_compression,
                            dtype=args.dtype, device=args.device,
                            offload=args.offload, compute_dtype=args.compute_dtype, gguf_out=args.gguf_out,
                            gguf_type=kind, resume=args.resume, progress=not args.quiet)
    say(result.summary())
    return 0


def add_demo(sub) -> None:
    d = sub.add_parser("demo", help="the main job: compress smollm2-135m with the paper's recipe and with smart-40, "
                       "retrain both, show before/after numbers side by side",
                       description="Compress a model (default smollm2-135m) with the paper's recipe and with "
                       "smart-40 (the best quality per byte measured here), retrain each compressed model by "
                       "distillation from the dense one (structure kept, the same budget), and print WikiText-2 "
                       "perplexity of the dense, compressed and recovered models (1024-token windows, the first "
                       "--limit windows), the parameter accounting, what each final model costs to run against the "
                       "dense one (decoding speed, prefill, peak RSS, bytes held; one bench run for all) and the "
                       "time taken. --recipe runs one recipe instead.")
    d.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    d.add_argument("--recipe", help="one recipe name or file instead of the two (paper and smart-40)")
    full, quick = RECOVERY_BUDGETS["full"], RECOVERY_BUDGETS["quick"]
    d.add_argument("--quick", action="store_true",
                   help=f"shorter in every phase: 8 calibration windows of 64 tokens, a coarser schedule, "
                   f"{quick['steps']} recovery steps of {quick['batch_size']} x {quick['seqlen']} tokens, 4 evaluation "
                   "windows, 16 decoded tokens")
    d.add_argument("--limit", type=positive, help="evaluation windows (16; --quick: 4)")
    seed(d)
    d.add_argument("--recover-steps", type=int, help=f"recovery steps after compression ({full['steps']} of "
                   f"{full['batch_size']} x {full['seqlen']} tokens; --quick: {quick['steps']}; 0 skips recovery; a "
                   "recipe with its own recover section sets its own)")
    d.add_argument("--recover-objective", choices=OBJECTIVES,
                   help="end_to_end (distil the whole model), blockwise (first fit each block to the dense "
                   "block's, or after depth the dense span's, outputs, then the end-to-end steps; docs/guide.md, "
                   "Retraining after compression) or auto (blockwise for a structured recipe, whose shapes "
                   f"changed). Default: {full['objective']}; --quick: {quick.get('objective', 'end_to_end')}")
    d.add_argument("--no-measure", action="store_true", help="skip measuring what the final model costs to run "
                   "against dense (decoding speed, prefill, peak RSS, bytes held: about a minute)")
    device(d)
    json_out(d, "also write the results to this JSON file")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from smartprune.runs.demo import DEMO_RECIPES, run_demos

    if args.recover_steps is not None and args.recover_steps < 0:
        raise DataError(f"--recover-steps must be 0 or more, got {args.recover_steps}")
    recipes = (args.recipe,) if args.recipe else DEMO_RECIPES
    result = run_demos(args.model, recipes, quick=args.quick, limit=args.limit, seed=args.seed,
                       recover_steps=args.recover_steps, device=args.device, json_path=args.json,
                       measure=not args.no_measure, recover_objective=args.recover_objective,
                       progress=not args.quiet)
    say(result.summary())
    return 0


# recover flags drawn from RecoverConfig's fields (validated by the recipe schema, so ranges and NaN are
# checked once); the budget, the window length and the compute dtype are declared beside them
RECOVER_FLAGS = ("text", "batch_size", "lr", "weight_decay", "temperature", "kl_weight", "ce_weight", "hidden_weight",
                 "hidden_layers", "objective", "lr_after_fits", "block_steps", "block_lr", "block_loss",
                 "cache_windows", "eval_every", "eval_windows", "checkpoint_minutes", "sharding")


def add_recover(sub) -> None:
    rc = sub.add_parser("recover", help="retrain a compressed model (distillation from the dense one) so it is usable",
                        description="Retrain COMPRESSED (a `compress --out` folder, or any MODEL for the dense "
                        "fine-tuned reference) on --text: KL to --teacher's logits plus next-token cross-entropy "
                        "(--teacher none: plain fine-tuning, the paper's retraining), AdamW with warm-up and cosine, "
                        "gradient clipping. Pruned entries stay zero, folded rows one vector, diagonals diagonal "
                        "(checked and reported). Progress bar with tokens/s, loss and ETA; held-out perplexity every "
                        "--eval-every steps; a checkpoint every few minutes beside --out, and on Ctrl-C; --resume "
                        "continues bit for bit. Several processes: --nproc N here, or "
                        "`torchrun --nproc-per-node N -m smartprune recover ...` (gloo on CPU, NCCL on GPU).")
    rc.add_argument("compressed", metavar="COMPRESSED", help="the model to retrain: " + MODEL_HELP)
    rc.add_argument("--teacher", required=True, help="the dense model to distil from (" + MODEL_HELP + "), or none")
    rc.add_argument("--out", required=True, help="folder for the recovered model (same format as COMPRESSED)")
    rc.add_argument("--dense-out", help="also write a plain Hugging Face folder of the recovered weights")
    gguf_flags(rc, "the recovered model")
    budget = rc.add_mutually_exclusive_group()  # steps, tokens or minutes
    config_flags(budget, RecoverConfig, ("steps", "tokens", "minutes"))
    renamed(rc, "--train-seqlen", "--seqlen", "--seqlen is an evaluation window elsewhere", dest="seqlen",
            type=positive, help="tokens per training window (default: 256)")
    config_flags(rc, RecoverConfig, RECOVER_FLAGS)
    compute_dtype(rc, "the training steps (default: auto)", default=None)
    device(rc)
    rc.add_argument("--nproc", type=positive, default=1, help="data-parallel processes on this machine (1)")
    rc.add_argument("--resume", action="store_true", help="continue the interrupted run that writes --out")
    seed(rc, "seed for the training windows")
    overwrite(rc)
    json_out(rc, "also write the recovery results to this JSON file")
    rc.set_defaults(func=cmd_recover)




# recover flags that act only on block-wise fits, or only on distillation from a teacher
BLOCK_FLAGS = ("lr_after_fits", "block_steps", "block_lr", "block_loss", "cache_windows")
TEACHER_FLAGS = ("kl_weight", "temperature", "hidden_weight", "hidden_layers")


def unused_recover_flags(given: dict, teacher: str, processes: int) -> None:
    """One line for a `recover` flag that does nothing with the others given, before any model loads (with
    objective auto the fits run where the model's shapes changed, so their flags stand)."""
    if given.get("objective") == "end_to_end":
        for name in BLOCK_FLAGS:
            if name in given:
                raise DataError(f"{flag_name(name)} acts on block-wise fits, and --objective end_to_end runs none")
    if teacher == "none":
        for name in TEACHER_FLAGS:
            if name in given:
                raise DataError(f"{flag_name(name)} acts on distillation from a teacher, and --teacher none trains "
                                "on the text alone")
    if given.get("kl_weight") == 0 and "temperature" in given:
        raise DataError("--temperature scales the KL term, and --kl-weight 0 turns it off")
    if given.get("sharding") == "fsdp" and processes == 1:
        raise DataError("--sharding fsdp splits the model over processes, and this run has one; give --nproc N "
                        "(or run under torchrun)")


def cmd_recover(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smartprune.files import write_json
    from smartprune.recipes.schema import build_section
    from smartprune.runs.recover import recover_model

    kind = gguf_type(args)
    given = {k: getattr(args, k) for k in (*RECOVER_FLAGS, "steps", "tokens", "minutes", "seqlen", "compute_dtype")
             if getattr(args, k) is not None}
    world = os.environ.get("WORLD_SIZE", "")  # torchrun's workers run with --nproc 1
    unused_recover_flags(given, args.teacher, max(args.nproc, int(world) if world.isdigit() else 1))
    given["teacher"] = "none" if args.teacher == "none" else "dense"
    cfg = build_section(RecoverConfig, given, "recover")
    run = recover_model(args.compressed, teacher=args.teacher, out=args.out, cfg=cfg, dense_out=args.dense_out,
                        gguf_out=args.gguf_out, gguf_type=kind, device=args.device, seed=args.seed,
                        resume=args.resume, overwrite=args.overwrite,
                        nproc=args.nproc, progress=not args.quiet)
    if run.rank != 0:
        return 0
    if args.json:
        write_json(Path(args.json), run.to_dict())
    say(run.summary())
    return 0


def add_train(sub) -> None:
    t = sub.add_parser("train", help="train a small GPT-2 from scratch on a text of the data folder",
                       description="Train a GPT-2 of --config from random weights on the train split of --text "
                       "(GPT-2 tokenizer from the data folder) within --steps and --minutes, score the first "
                       "test windows, and save a Hugging Face folder to --out.")
    t.add_argument("--config", default="gpt2-mini", help="gpt2-tiny, gpt2-mini (default) or gpt2-small")
    t.add_argument("--text", default="wikitext2", help="wikitext2 (default) or ptb")
    t.add_argument("--steps", type=positive, default=1000, help="optimizer steps (1000)")
    t.add_argument("--minutes", type=float, help="stop earlier when this many minutes have passed")
    t.add_argument("--batch-size", type=positive, default=8, help="sequences per step (8)")
    renamed(t, "--train-seqlen", "--seqlen", "--seqlen is an evaluation window elsewhere", dest="seqlen",
            type=positive, default=128, help="tokens per training sequence (128)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    seed(t)
    t.add_argument("--out", required=True, help="folder to save the trained model to")
    device(t)
    overwrite(t, "replace an output folder that is not empty")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from smartprune.training.pretrain import TrainConfig, train

    cfg = TrainConfig(config=args.config, text=args.text, steps=args.steps, minutes=args.minutes,
                      batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr, seed=args.seed)
    summary = train(cfg, args.out, overwrite=args.overwrite, device=args.device, progress=not args.quiet)
    t = summary["test"]
    say(f"trained {cfg.config} ({summary['parameters']:,} parameters) on {cfg.text} for {summary['steps_done']} "
         f"steps in {summary['seconds']:.0f} s: loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}, "
         f"test perplexity {t['perplexity']:.2f} (first {t['windows']} windows of {t['seqlen']})\nsaved to {args.out}")
    return 0
