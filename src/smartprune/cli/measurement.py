"""Commands that measure models: eval, generate, classify, bench.

Each command is its parser (``add_*``) beside what it runs (``cmd_*``); heavy modules are imported
inside the command, so ``--help`` stays fast."""

from __future__ import annotations

import argparse

from smartprune.cli.shared import (
    MODEL_HELP,
    compute_dtype,
    device,
    eval_options,
    eval_settings,
    json_out,
    positive,
    renamed,
    say,
    unused_eval_flags,
)


def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="quality of one or more models, side by side",
                       description="Evaluate each MODEL on each task and print one table; with two or more "
                       "models the first is the reference and the others show deltas. Tasks: perplexity "
                       "(wikitext2, wikitext103, ptb: standard protocol, non-overlapping windows, trailing "
                       "partial window dropped), classification (cola, sst2, mrpc, rte, qnli, mnli, sms, qqp; "
                       "--mode zero-shot or finetune; a task without data here is reported as not available), "
                       "generation (repetition and meaningless-word rates, see docs/evaluation.md), and any "
                       "lm-evaluation-harness task as lm-eval:NAME (its own task definition, run on the model as "
                       "smartprune loaded it; the optional lm-eval extra).")
    e.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    e.add_argument("--tasks", default="wikitext2", help="comma-separated task names (wikitext2); "
                   "lm-eval:NAME[,NAME...] for lm-evaluation-harness tasks, e.g. lm-eval:arc_easy,hellaswag")
    e.add_argument("--lm-eval-include", metavar="DIR", help="a folder of local lm-eval task YAMLs (lm-eval's "
                   "--include_path); --examples N runs the first N documents of each lm-eval task. Its YAMLs "
                   "may not run Python (`!function`) unless --lm-eval-allow-code")
    e.add_argument("--lm-eval-allow-code", action="store_true", help="let the --lm-eval-include folder's task "
                   "YAMLs import and run their Python (`!function`): only for a folder you trust")
    eval_options(e, "perplexity", "classification", "mode", "finetune", "generation", "device", "resident")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from smartprune.evaluation.suite import kinds_of
    from smartprune.runs.evaluate import evaluate_models

    settings = eval_settings(args)  # values checked first (a mistyped --mode gets its suggestion)
    unused_eval_flags(args, kinds_of(args.tasks.split(",")))
    result = evaluate_models(args.models, tasks=args.tasks.split(","), settings=settings,
                             json_path=args.json, device=args.device, compute_dtype=args.compute_dtype,
                             progress=not args.quiet, resident=args.resident)
    say(result.summary())
    return 0


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text and measure repetition and meaningless words",
                       description="Continue each prompt with each MODEL (greedy by default, or seeded sampling), "
                       "print the texts, and measure repetition@N and meaningless@N at each --lengths N.")
    g.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    eval_options(g, "generation", "device", "resident")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from smartprune.runs.evaluate import evaluate_models

    result = evaluate_models(args.models, tasks=["generation"], settings=eval_settings(args), json_path=args.json,
                             device=args.device, compute_dtype=args.compute_dtype, progress=not args.quiet,
                             resident=args.resident)
    for model, res in result.results.items():
        for prompt, text in res["generation"]["texts"].items():
            say(f"--- {model} | {res['generation']['decoding']} | {prompt!r}\n{prompt}{text}\n")
    say(result.summary())
    return 0


def add_classify(sub) -> None:
    f = sub.add_parser("classify", help="fine-tune a classifier, compress it, score it before and after",
                       description="The paper's Table 6 setting: fine-tune MODEL with a classification head on "
                       "TASK's train split (budget: --max-train, --epochs, --ft-seqlen), score the dev split, "
                       "compress with --recipe (calibration on the task's examples; stages with objective: task "
                       "fit the classification loss), and score it again.")
    f.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    f.add_argument("--task", required=True, help="a classification task with a train split here: cola, sst2, "
                   "mrpc, rte, sms")
    f.add_argument("--recipe", default="paper", help="recipe name or file (paper)")
    renamed(f, "--calib-examples", "--calib-samples", "--calib-samples counts calibration windows elsewhere",
            dest="calib_samples", type=positive, default=64, help="training examples used as calibration (64)")
    eval_options(f, "classification", "finetune", "device")
    f.set_defaults(func=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> int:
    from smartprune.runs.classify import compress_classifier

    s = eval_settings(args)
    result = compress_classifier(args.model, args.task, args.recipe, finetune=s.finetune, examples=args.examples,
                                 calib_samples=args.calib_samples, seed=args.seed, json_path=args.json,
                                 device=args.device, compute_dtype=args.compute_dtype, progress=not args.quiet)
    say(result.summary())
    return 0


def add_bench(sub) -> None:
    b = sub.add_parser("bench", help="size and speed of models, side by side in one process",
                       description="Measure each MODEL in one process, interleaved round by round after a warm-up: "
                       "forward latency (batch 1 at 128/512/1024 tokens, batch 8 at 128), greedy generation "
                       "tokens/s with KV cache, throughput (sequences/s), fine-tuning steps (sequences/s), peak "
                       "RSS of loading + one forward of the longest length and the loading time (each model in its own "
                       "subprocess), bytes held in memory, peak GPU memory on a GPU, and size on disk; each compressed "
                       "folder once per --resident. Medians, "
                       "spreads, and ratios to the first MODEL (the dense baseline) in the same compute dtype.")
    b.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    b.add_argument("--repeats", type=positive, default=5, help="measured rounds per metric (5)")
    b.add_argument("--lengths", type=positive, nargs="+", default=[128, 512, 1024],
                   help="batch-1 forward lengths; the first is also used for batch 8 and training (128 512 1024)")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    b.add_argument("--new-tokens", type=positive, default=128, help="generated tokens per generation run (128)")
    b.add_argument("--no-rss", action="store_true", help="skip the per-model peak-RSS subprocesses")
    b.add_argument("--batches", type=positive, nargs="+", default=[8],
                   help="throughput batch sizes at the first length (8; the paper's Table 8: 8 32)")
    device(b, "auto (a GPU when torch sees one), cpu, cuda or cuda:N; on a GPU "
                   "timing is CUDA-synchronized and peak GPU memory is reported")
    compute_dtype(b, "the timed forwards and training steps, e.g. float32 bfloat16", several=True)
    b.add_argument("--resident", nargs="+", choices=["compact", "dense"], default=["compact", "dense"],
                   help="how each compressed folder is held, one entry per residency: compact (as stored, "
                   "unpacked per product; no fine-tuning step) and dense (unpacked once) (default: both)")
    b.add_argument("--energy", action="store_true",
                   help="also joules per token of the largest batch's forward, from NVML on a GPU or RAPL on a CPU, "
                   "idle draw subtracted; where no counter exists the table says 'not measurable here'")
    b.add_argument("--semi-structured", action="store_true",
                   help="GPU only: run every 2:4 matrix of each compressed folder (recipes with pattern: 2:4) on "
                   "torch's semi-structured sparse kernels (cuSPARSELt), in bfloat16 or float16")
    b.add_argument("--gguf-in", choices=["llama.cpp", "transformers"], default="llama.cpp",
                   help="where a .gguf MODEL is timed: llama.cpp (llama-bench on the same threads: prefill at each "
                   "--lengths, decoding of --new-tokens, file and tensor bytes, peak RSS; built once from source) "
                   "or transformers (converted like any model) (default: llama.cpp)")
    b.add_argument("--decode", choices=["eager", "compiled"], default="eager",
                   help="how transformers decodes: eager (default) or compiled (a static KV cache whose step "
                   "torch.compile compiles once, in the warm-up round: about a minute per model; fewer Python and "
                   "dispatch costs per token)")
    json_out(b, "write the results to this JSON file and a Markdown twin beside it")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smartprune.runs.bench import BenchSettings, bench, write_outputs

    settings = BenchSettings(repeats=args.repeats, lengths=tuple(args.lengths), threads=args.threads,
                             new_tokens=args.new_tokens, rss=not args.no_rss, batches=tuple(args.batches),
                             device=args.device, compute_dtypes=tuple(args.compute_dtype),
                             residencies=tuple(args.resident), semi_structured=args.semi_structured,
                             energy=args.energy, gguf=args.gguf_in, decode=args.decode)
    result = bench(args.models, settings, progress=not args.quiet)
    if args.json:
        write_outputs(result, Path(args.json))
    say(result.summary())
    return 0
