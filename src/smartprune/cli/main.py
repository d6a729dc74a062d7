"""``smartprune``: a thin command line over the library API.

Each subcommand parses its flags into plain values and calls one library function; heavy modules
(torch, transformers) are imported only inside the command that needs them, so ``--help`` is fast.
User errors print one line and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from smartprune.cli.commands import (
    cmd_bench,
    cmd_classify,
    cmd_compare,
    cmd_compress,
    cmd_demo,
    cmd_eval,
    cmd_generate,
    cmd_recipes,
    cmd_recover,
    cmd_report,
    cmd_sweep,
    cmd_train,
)
from smartprune.errors import SmartpruneError, Terminated, did_you_mean

log = logging.getLogger("smartprune")

MODEL_HELP = ("a local Hugging Face folder, a .gguf file, a folder written by `smartprune compress --out`, "
              "the built-in name smollm2-135m, or a hub id (needs a network)")


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" on unknown subcommands and choices."""

    def error(self, message: str):
        if "invalid choice:" in message:
            word = message.split("invalid choice:", 1)[1].split("'")[1]
            choices = message.split("choose from", 1)[1] if "choose from" in message else ""
            options = [c.strip(" '()") for c in choices.split(",")]
            message += did_you_mean(word, options)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return n


# ---------------------------------------------------------------------------------- parser
def build_parser() -> Parser:
    p = Parser(prog="smartprune", description="Compress causal language models with the smart-pruning methods "
               "of Belhaouari & Kraidia (2025), and measure what it costs and buys.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    r = sub.add_parser("recipes", help="list the built-in recipes", description="List the built-in recipes, "
                       "one line each; --fields also lists every recipe field with its default.")
    r.add_argument("--fields", action="store_true", help="also list each stage's fields and defaults")
    r.set_defaults(func=cmd_recipes)

    c = sub.add_parser("compress", help="compress a model with a recipe",
                       description="Compress MODEL with a recipe and write the compressed model (loadable with "
                       "smartprune.load) and report.json to --out.")
    c.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    c.add_argument("--recipe", required=True, help="a built-in recipe name (see `smartprune recipes`) or a "
                   ".yaml/.json file")
    c.add_argument("--out", required=True, help="folder for the compressed model and report.json")
    c.add_argument("--dense-out", help="also write a plain Hugging Face folder with the compressed weights "
                   "materialized (vanilla from_pretrained loads it)")
    c.add_argument("--seed", type=int, default=0, help="seed for calibration windows and random choices (0)")
    c.add_argument("--calib-samples", type=_positive, help="override the recipe's calibration window count")
    c.add_argument("--calib-seqlen", type=_positive, help="override the recipe's calibration window length")
    c.add_argument("--target-compression", type=float, help="the overall compression to reach exactly, for a recipe "
                   "with an overall section (e.g. smart): rates per group and layer chosen by measured sensitivity")
    c.add_argument("--dtype", default="float32", help="stored value precision in --out: float32 (default), float16, "
                   "bfloat16, or int8 (every weight matrix's surviving values as 8-bit integers with one scale per "
                   "output channel; norms, biases and IRC vectors float32)")
    c.add_argument("--device", default="auto", help="where compression (and a recipe's recover section) runs: auto "
                   "(a GPU when torch sees one), cpu, cuda or cuda:N")
    c.add_argument("--compute-dtype", default="auto", help="precision of the calibration forward passes and fits: auto "
                   "(bfloat16 on a GPU, float32 on a CPU), float32, bfloat16 or float16; statistics and Hessians are "
                   "accumulated in float64 whatever it is")
    c.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the block being compressed on the GPU, the others in host memory (default: when "
                   "the model would not fit the GPU's free memory); needs objectives local to each sublayer")
    c.add_argument("--overwrite", action="store_true", help="replace output folders that are not empty")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("demo", help="the main job: compress smollm2-135m, retrain it, show before/after numbers",
                       description="Compress a model (default smollm2-135m, recipe paper), retrain the compressed "
                       "model by distillation from the dense one (structure kept), and print WikiText-2 perplexity "
                       "of the dense, compressed and recovered model (1024-token windows, the first --limit "
                       "windows), the parameter accounting and the time taken.")
    d.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    d.add_argument("--recipe", default="paper", help="recipe name or file (paper)")
    d.add_argument("--quick", action="store_true",
                   help="8 calibration windows of 64 tokens, 4 evaluation windows: a few minutes")
    d.add_argument("--limit", type=_positive, help="evaluation windows (16; --quick: 4)")
    d.add_argument("--seed", type=int, default=0, help="seed (0)")
    d.add_argument("--recover-steps", type=int, help="recovery steps after compression (120; --quick: 16; "
                   "0 skips recovery; a recipe with its own recover section sets its own)")
    d.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    d.add_argument("--json", help="also write the results to this JSON file")
    d.set_defaults(func=cmd_demo)

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
    rc.add_argument("--text", help="training text: wikitext2 (default), ptb, or a UTF-8 text file")
    budget = rc.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive, help="optimizer steps (default 200)")
    budget.add_argument("--tokens", type=_positive, help="training tokens")
    budget.add_argument("--minutes", type=float, help="wall-time budget (steps sized from the first steps)")
    rc.add_argument("--seqlen", type=_positive, help="tokens per window (256)")
    rc.add_argument("--batch-size", type=_positive, help="windows per step, over all processes (8)")
    rc.add_argument("--lr", type=float, help="peak learning rate (2e-4)")
    rc.add_argument("--weight-decay", type=float, help="AdamW weight decay (0)")
    rc.add_argument("--temperature", type=float, help="distillation temperature (1)")
    rc.add_argument("--kl-weight", type=float, help="weight of the KL term (1)")
    rc.add_argument("--ce-weight", type=float, help="weight of the next-token cross-entropy (1)")
    rc.add_argument("--hidden-weight", type=float, help="weight of last-hidden-state matching (0)")
    rc.add_argument("--eval-every", type=_positive, help="steps between held-out perplexity checks (50)")
    rc.add_argument("--eval-windows", type=_positive, help="held-out windows of the text's validation split (4)")
    rc.add_argument("--checkpoint-minutes", type=float, help="minutes between checkpoints (5)")
    rc.add_argument("--compute-dtype", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    rc.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    rc.add_argument("--nproc", type=_positive, default=1, help="data-parallel processes on this machine (1)")
    rc.add_argument("--sharding", help="with several processes: none (default; each holds the whole model, "
                    "gradients averaged as in DDP) or fsdp (parameters, gradients and optimizer state split over "
                    "the processes, for a model that does not fit one device)")
    rc.add_argument("--resume", action="store_true", help="continue the interrupted run that writes --out")
    rc.add_argument("--seed", type=int, default=0, help="seed for the training windows (0)")
    rc.add_argument("--overwrite", action="store_true", help="replace output folders that are not empty")
    rc.add_argument("--json", help="also write the recovery results to this JSON file")
    rc.set_defaults(func=cmd_recover)

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
    k.add_argument("--seqlen", type=_positive, default=1024, help="evaluation window length (1024)")
    k.add_argument("--calib-samples", type=_positive, default=32, help="calibration windows (32)")
    k.add_argument("--calib-seqlen", type=_positive, default=128, help="tokens per calibration window (128)")
    k.add_argument("--seed", type=int, default=0, help="seed (0)")
    k.add_argument("--recover-tokens", type=_positive, help="also retrain every model with this many WikiText-2 "
                   "train tokens (distillation from the dense model) and add a dense fine-tuned row: the ranking "
                   "at equal size and equal retraining")
    k.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    k.add_argument("--json", help="write rows to this JSON file, and a Markdown twin beside it")
    k.set_defaults(func=cmd_compare)

    e = sub.add_parser("eval", help="quality of one or more models, side by side",
                       description="Evaluate each MODEL on each task and print one table; with two or more "
                       "models the first is the reference and the others show deltas. Tasks: perplexity "
                       "(wikitext2, wikitext103, ptb: standard protocol, non-overlapping windows, trailing "
                       "partial window dropped), classification (cola, sst2, mrpc, rte, qnli, mnli, sms, qqp; "
                       "--mode zero-shot or finetune; a task without data here is reported as not available), "
                       "and generation (repetition and meaningless-word rates, see docs/evaluation.md).")
    e.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    e.add_argument("--tasks", default="wikitext2", help="comma-separated task names (wikitext2)")
    _eval_options(e, "perplexity", "classification", "mode", "finetune", "generation", "device", "resident")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text and measure repetition and meaningless words",
                       description="Continue each prompt with each MODEL (greedy by default, or seeded sampling), "
                       "print the texts, and measure repetition@N and meaningless@N at each --lengths N.")
    g.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    _eval_options(g, "generation", "device", "resident")
    g.set_defaults(func=cmd_generate)

    f = sub.add_parser("classify", help="fine-tune a classifier, compress it, score it before and after",
                       description="The paper's Table 6 setting: fine-tune MODEL with a classification head on "
                       "TASK's train split (budget: --max-train, --epochs, --ft-seqlen), score the dev split, "
                       "compress with --recipe (calibration on the task's examples; stages with objective: task "
                       "fit the classification loss), and score it again.")
    f.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    f.add_argument("--task", required=True, help="a classification task with a train split here: cola, sst2, "
                   "mrpc, rte, sms")
    f.add_argument("--recipe", default="paper", help="recipe name or file (paper)")
    f.add_argument("--calib-samples", type=_positive, default=64, help="training examples used as calibration (64)")
    _eval_options(f, "classification", "finetune", "device")
    f.set_defaults(func=cmd_classify)

    b = sub.add_parser("bench", help="size and speed of models, side by side in one process",
                       description="Measure each MODEL in one process, interleaved round by round after a warm-up: "
                       "forward latency (batch 1 at 128/512/1024 tokens, batch 8 at 128), greedy generation "
                       "tokens/s with KV cache, throughput (sequences/s), fine-tuning steps (sequences/s), peak "
                       "RSS of loading + one forward of the longest length and the loading time (each model in its own "
                       "subprocess), bytes held in memory, peak GPU memory on a GPU, and size on disk; each compressed "
                       "folder once per --resident. Medians, "
                       "spreads, and ratios to the first MODEL (the dense baseline) in the same compute dtype.")
    b.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    b.add_argument("--repeats", type=_positive, default=5, help="measured rounds per metric (5)")
    b.add_argument("--lengths", type=_positive, nargs="+", default=[128, 512, 1024],
                   help="batch-1 forward lengths; the first is also used for batch 8 and training (128 512 1024)")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    b.add_argument("--new-tokens", type=_positive, default=128, help="generated tokens per generation run (128)")
    b.add_argument("--no-rss", action="store_true", help="skip the per-model peak-RSS subprocesses")
    b.add_argument("--batches", type=_positive, nargs="+", default=[8],
                   help="throughput batch sizes at the first length (8; the paper's Table 8: 8 32)")
    b.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N; on a GPU "
                   "timing is CUDA-synchronized and peak GPU memory is reported")
    b.add_argument("--compute-dtype", nargs="+", default=["auto"],
                   help="forward/training precision, one entry per model and dtype: auto (bfloat16 on a GPU, "
                   "float32 on a CPU), float32, bfloat16, float16 (e.g. float32 bfloat16)")
    b.add_argument("--resident", nargs="+", choices=["compact", "dense"], default=["compact", "dense"],
                   help="how each compressed folder is held, one entry per residency: compact (as stored, "
                   "unpacked per product; no fine-tuning step) and dense (unpacked once) (default: both)")
    b.add_argument("--semi-structured", action="store_true",
                   help="GPU only: run every 2:4 matrix of each compressed folder (recipes with pattern: 2:4) on "
                   "torch's semi-structured sparse kernels (cuSPARSELt), in bfloat16 or float16")
    b.add_argument("--json", help="write the results to this JSON file and a Markdown twin beside it")
    b.set_defaults(func=cmd_bench)

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
    w.add_argument("--seqlen", type=_positive, default=1024, help="perplexity window (1024)")
    w.add_argument("--calib-samples", type=_positive, help="override the calibration window count")
    w.add_argument("--calib-seqlen", type=_positive, help="override the calibration window length")
    w.add_argument("--seed", type=int, default=0, help="seed (0)")
    w.add_argument("--recover-tokens", type=_positive, help="retrain every point (the dense one too) with this many "
                   "WikiText-2 train tokens before evaluating: curves at equal retraining")
    w.add_argument("--device", default="auto", help="where points are compressed, evaluated and retrained: auto "
                   "(a GPU when torch sees one), cpu, cuda or cuda:N")
    w.add_argument("--json", help="write (and resume from) this JSON file")
    w.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help="one HTML page (+ Markdown) of tables and figures from measured runs",
                        description="Build a report from RUNs: JSON files written by eval, classify, compare, bench "
                        "or sweep (--json), and compress --out folders. Tables in the form of the paper's Tables 3, "
                        "4, 5, 6 and 8 with the paper's numbers beside them (labelled reported), sweep curves, "
                        "before/after weight pictures, and the command that regenerates each figure.")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="a --json file or a compress --out folder")
    rp.add_argument("--out", required=True, help="folder for index.html, report.md and figures/")
    rp.add_argument("--block", type=int, default=0, help="block whose weights are drawn (0)")
    rp.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")
    rp.set_defaults(func=cmd_report)

    t = sub.add_parser("train", help="train a small GPT-2 from scratch on a text of the data folder",
                       description="Train a GPT-2 of --config from random weights on the train split of --text "
                       "(GPT-2 tokenizer from the data folder) within --steps and --minutes, score the first "
                       "test windows, and save a Hugging Face folder to --out.")
    t.add_argument("--config", default="gpt2-mini", help="gpt2-tiny, gpt2-mini (default) or gpt2-small")
    t.add_argument("--text", default="wikitext2", help="wikitext2 (default) or ptb")
    t.add_argument("--steps", type=_positive, default=1000, help="optimizer steps (1000)")
    t.add_argument("--minutes", type=float, help="stop earlier when this many minutes have passed")
    t.add_argument("--batch-size", type=_positive, default=8, help="sequences per step (8)")
    t.add_argument("--seqlen", type=_positive, default=128, help="tokens per sequence (128)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed (0)")
    t.add_argument("--out", required=True, help="folder to save the trained model to")
    t.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    t.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")
    t.set_defaults(func=cmd_train)
    return p


def _eval_options(p: argparse.ArgumentParser, *groups: str) -> None:
    """Options shared by eval, generate and classify, by group: perplexity, classification, finetune,
    generation (every command gets --seed and --json)."""
    if "perplexity" in groups:
        p.add_argument("--seqlen", type=_positive, default=1024, help="perplexity window length (1024)")
        p.add_argument("--stride", type=_positive, help="sliding-window perplexity stride (default: non-overlapping)")
        p.add_argument("--limit", type=int, help="perplexity: only the first N windows")
    if "classification" in groups:
        p.add_argument("--examples", type=int, help="classification: at most N dev examples (a seeded subset)")
    if "mode" in groups:
        p.add_argument("--mode", default="zero-shot", help="classification: zero-shot (default) or finetune")
    if "finetune" in groups:
        p.add_argument("--max-train", type=int, default=1000, help="fine-tune: training examples (1000)")
        p.add_argument("--epochs", type=int, default=1, help="fine-tune: epochs (1)")
        p.add_argument("--ft-seqlen", type=int, default=128, help="fine-tune: tokens per example (128)")
        p.add_argument("--ft-batch-size", type=int, default=8, help="fine-tune: examples per step (8)")
        p.add_argument("--lr", type=float, default=3e-5, help="fine-tune: learning rate (3e-5)")
    if "generation" in groups:
        p.add_argument("--prompt", action="append", help="generation prompt (repeatable; default: the paper's "
                       "two, 'Once upon a time' and 'The Industrial Revolution')")
        p.add_argument("--lengths", type=_positive, nargs="+", default=[128, 512],
                       help="generation: token counts the metrics are taken at (128 512)")
        p.add_argument("--sample", action="store_true", help="generation: seeded nucleus sampling, not greedy")
    if "device" in groups:
        p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
        p.add_argument("--compute-dtype", default="auto", help="forward precision: auto (default: bfloat16 on a GPU, "
                       "float32 on a CPU), float32, bfloat16 or float16")
    if "resident" in groups:
        p.add_argument("--resident", choices=["dense", "compact"], default="dense",
                       help="how a compressed folder is held in memory: dense (default; unpacked once, fastest) or "
                       "compact (as stored, unpacked per product: smallest, slower; docs/compact-results.md)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--json", help="write the results to this JSON file")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    if args.quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"
    _quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    previous = _terminate_like_interrupt()
    try:
        return func(args)
    except SmartpruneError as exc:
        sys.stderr.write(f"smartprune: error: {exc}\n")
        return exc.exit_code
    except Terminated:
        sys.stderr.write("smartprune: terminated\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("smartprune: interrupted\n")
        return 130
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def _terminate_like_interrupt():
    """SIGTERM unwinds like Ctrl-C (finally blocks clean up) while a command runs; returns the
    handler to restore (None where no handler can be set: not the main thread)."""
    import signal
    import threading

    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _configure_logging(quiet: bool) -> None:
    """Our messages as 'smartprune: ...' lines; other libraries' only when they are errors."""
    if not any(getattr(h, "_smartprune", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("smartprune: %(message)s"))
        handler._smartprune = True
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    for name in ("huggingface_hub", "transformers", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_libraries() -> None:
    """transformers' own progress bars and advice would drown ours."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # already imported (e.g. in-process use): the env is read too late
        sys.modules["transformers"].utils.logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
