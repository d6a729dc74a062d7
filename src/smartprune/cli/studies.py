"""Commands that compare methods and report: compare, sweep, report.

Each command is its parser (``add_*``) beside what it runs (``cmd_*``); heavy modules are imported
inside the command, so ``--help`` stays fast."""

from __future__ import annotations

import argparse

from smartprune.cli.shared import (
    MODEL_HELP,
    compute_dtype,
    device,
    json_out,
    overwrite,
    positive,
    say,
    seed,
    window,
)


def add_compare(sub) -> None:
    k = sub.add_parser("compare", help="the paper's method beside magnitude, Wanda and SparseGPT",
                       description="Run each method on the same model, calibration windows and seed, evaluate "
                       "WikiText-2 and PTB perplexity, and print one table (JSON and Markdown with --json). "
                       "Baselines prune every linear of every block; recipes run as written.")
    k.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    k.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt,paper",
                   help="comma-separated: dense, magnitude, magnitude-global, wanda, sparsegpt, or recipe names/files")
    k.add_argument("--sparsity", default="0.5", help="comma-separated baseline targets: a fraction (0.5), an N:M "
                   "pattern (2:4), or match:RECIPE (the same parameter reduction as RECIPE)")
    k.add_argument("--tasks", default="wikitext2,ptb", help="perplexity tasks (wikitext2,ptb)")
    k.add_argument("--limit", type=int, help="evaluate only the first N windows of each task")
    k.add_argument("--seqlen", type=positive, default=1024, help="evaluation window length (1024)")
    k.add_argument("--calib-samples", type=positive, default=32, help="calibration windows (32)")
    k.add_argument("--calib-seqlen", type=window, default=128, help="tokens per calibration window (128)")
    seed(k)
    k.add_argument("--recover-tokens", type=positive, help="also retrain every model with this many WikiText-2 "
                   "train tokens (distillation from the dense model) and add a dense fine-tuned row: the ranking "
                   "at equal size and equal retraining")
    k.add_argument("--recover-budget", choices=("quick", "full"), help="instead of --recover-tokens: the demo's "
                   "recovery budget for every model (quick: 8 steps of 4 x 128 tokens; full: 40 steps of 4 x 256)")
    k.add_argument("--measure", help="also measure every final model's running cost against dense, in one bench "
                   "run: speed (greedy decoding tokens/s, 512-token prefill, batch-8 throughput), memory (bytes held "
                   "once loaded, weight files, peak RSS of load + forward); e.g. speed,memory")
    k.add_argument("--keep", help="with --measure: write the measured models to this new folder (default: a "
                   "temporary folder, removed after)")
    device(k)
    compute_dtype(k, "the compression and retraining forwards (evaluation is float32)")
    json_out(k, "write rows to this JSON file, and a Markdown twin beside it; until then (without --measure) each "
             "method's rows are kept in .FILE.partial beside it as they finish, and the same command resumes from them")
    k.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from smartprune.errors import DataError
    from smartprune.runs.compare import CompareSettings, resume_file, run_compare, write_outputs
    from smartprune.runs.cost import parse_measures

    measures = parse_measures(args.measure)
    if args.keep and not measures:
        raise DataError("--keep names where the measured models go: it needs --measure")
    settings = CompareSettings(model=args.model, methods=args.methods.split(","), sparsities=args.sparsity.split(","),
                               tasks=args.tasks.split(","), limit=args.limit, seqlen=args.seqlen,
                               calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                               recover_tokens=args.recover_tokens, recover_budget=args.recover_budget,
                               device=args.device, compute_dtype=args.compute_dtype, measure=measures,
                               keep=Path(args.keep).expanduser() if args.keep else None)
    json_path = Path(args.json) if args.json else None  # `~` already expanded by check_paths
    partial = resume_file(json_path) if json_path and not measures else None
    result = run_compare(settings, progress=not args.quiet, partial=partial)
    if json_path:
        write_outputs(result, json_path)
    say(result.summary())
    return 0


def add_sweep(sub) -> None:
    w = sub.add_parser("sweep", help="compression curves: one method at many rates, evaluated at each",
                       description="Compress a fresh copy of MODEL with --method at every rate (and variant) and "
                       "evaluate each point on --tasks. Points are saved to --json as they finish; re-running the "
                       "same command resumes. Variants: q, k, qk (IRC, Fig. 10); lower, upper, both (DWC, "
                       "Fig. 11); direct, optimized, cumulative or 'ablation' for all three (Fig. 16).")
    w.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    w.add_argument("--method", required=True, help="irc, dwc, fpp-emb, fpp-ff, irc+dwc, magnitude, wanda, sparsegpt")
    w.add_argument("--rates", default="0:1:0.1", help="start:stop:step or a comma list, in [0, 1] (0:1:0.1)")
    w.add_argument("--variants", help="comma-separated variants (default: the stage's own settings)")
    w.add_argument("--tasks", default="wikitext2", help="evaluation tasks (wikitext2)")
    w.add_argument("--base", default="paper", help="recipe whose stage settings, strategy and calibration are used")
    w.add_argument("--limit", type=int, help="perplexity: first N windows")
    w.add_argument("--examples", type=int, help="classification: at most N dev examples")
    w.add_argument("--seqlen", type=positive, default=1024, help="perplexity window (1024)")
    w.add_argument("--calib-samples", type=positive, help="override the calibration window count")
    w.add_argument("--calib-seqlen", type=window, help="override the calibration window length")
    seed(w)
    w.add_argument("--recover-tokens", type=positive, help="retrain every point (the dense one too) with this many "
                   "WikiText-2 train tokens before evaluating: curves at equal retraining")
    device(w, "where points are compressed, evaluated and retrained: auto "
                   "(a GPU when torch sees one), cpu, cuda or cuda:N")
    json_out(w, "write (and resume from) this JSON file", read_back=True)
    w.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from smartprune.errors import DataError
    from smartprune.evaluation.suite import kinds_of
    from smartprune.runs.sweep import SweepSettings, parse_rates, run_sweep, summary

    kinds = kinds_of(args.tasks.split(","))  # a flag for tasks the sweep does not evaluate would do nothing
    if args.examples is not None and not kinds & {"classification", "lm-eval"}:
        raise DataError(f"--examples acts on classification and lm-eval tasks, and --tasks {args.tasks} has none")
    if args.limit is not None and "perplexity" not in kinds:
        raise DataError(f"--limit acts on perplexity tasks, and --tasks {args.tasks} has none")
    settings = SweepSettings(model=args.model, method=args.method, rates=parse_rates(args.rates),
                             variants=args.variants.split(",") if args.variants else [""],
                             tasks=args.tasks.split(","), base=args.base, limit=args.limit, examples=args.examples,
                             seqlen=args.seqlen, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                             seed=args.seed, recover_tokens=args.recover_tokens, device=args.device)
    say(summary(run_sweep(settings, args.json, progress=not args.quiet)))
    return 0


def add_report(sub) -> None:
    rp = sub.add_parser("report", help="one HTML page (+ Markdown) of tables and figures from measured runs",
                        description="Build a report from RUNs: JSON files written by eval, classify, compare, bench "
                        "or sweep (--json), and compress --out folders. Tables in the form of the paper's Tables 3, "
                        "4, 5, 6 and 8 with the paper's numbers beside them (labelled reported), sweep curves, "
                        "before/after weight pictures, and the command that regenerates each figure.")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="a --json file or a compress --out folder")
    rp.add_argument("--out", required=True, help="folder for index.html, report.md and figures/")
    rp.add_argument("--block", type=int, default=0, help="block whose weights are drawn (0)")
    overwrite(rp, "replace an output folder that is not empty")
    rp.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from smartprune.reporting.report import write_report

    out = write_report(args.runs, args.out, block=args.block, overwrite=args.overwrite)
    say(f"report: {out / 'index.html'} (Markdown twin: {out / 'report.md'}, figures in {out / 'figures'})")
    return 0
