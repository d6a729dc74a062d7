"""What every command shares: the parser class with "did you mean", the flag groups said once
(``--device``, ``--seed``, ``--json``, ``--overwrite``, the evaluation options), printing, and the
evaluation settings built from whichever of those flags a command has."""

from __future__ import annotations

import argparse
import sys

from smartprune.errors import DataError, did_you_mean

DEVICE_HELP = "auto (a GPU when torch sees one), cpu, cuda or cuda:N"

MODEL_HELP = ("a local Hugging Face folder, a .gguf file, a folder written by `smartprune compress --out`, "
              "a built-in name (smollm2-135m, gemma3-270m), or a hub id (needs a network)")


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


def flag_name(dest: str) -> str:
    """The command-line spelling of an option's dest: lr_after_fits -> --lr-after-fits."""
    return "--" + dest.replace("_", "-")


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return n


def window(value: str) -> int:
    """A window length in tokens: next-token statistics need at least two."""
    n = int(value)
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected a window of at least 2 tokens, got {value}")
    return n


def device(p: argparse.ArgumentParser, what: str = DEVICE_HELP) -> None:
    """``--device``; the CLI resolves it once (`smartprune.cli.main`) and passes a torch.device on."""
    p.add_argument("--device", default="auto", help=what)


COMPUTE_DTYPES = "auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16 or float16"


def compute_dtype(p: argparse.ArgumentParser, what: str, *, several: bool = False, default: str | None = "auto"
                  ) -> None:
    """``--compute-dtype``, said once: the precision of `what` (forward passes run under autocast;
    weights stay float32). `several`: one entry per value (bench)."""
    p.add_argument("--compute-dtype", nargs="+" if several else None, default=[default] if several else default,
                   help=f"precision of {what}: {COMPUTE_DTYPES}" + (" (one row per entry)" if several else ""))


class Renamed(argparse.Action):
    """A flag under its new name that still takes its old spelling for one release, with a one-line
    notice when the old one is used (each flag name has one meaning across subcommands)."""

    def __init__(self, option_strings, dest, old: str = "", why: str = "", **kwargs) -> None:
        self.old, self.why = old, why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string == self.old:
            sys.stderr.write(f"smartprune: {self.old} is now {self.option_strings[0]} here ({self.why}); the old "
                             "spelling works until the next release\n")
        setattr(namespace, self.dest, values)


def renamed(p: argparse.ArgumentParser, new: str, old: str, why: str, **kwargs) -> None:
    p.add_argument(new, old, action=Renamed, old=old, why=why, **kwargs)


def config_flags(p, cls, names: tuple[str, ...], *, flags: dict[str, str] | None = None) -> None:
    """One flag per field of the config dataclass `cls` in `names`, drawn from the field's metadata (its
    doc, choices and default, `recipes.schema.option`), so the help says what the recipe key says. Each
    defaults to None (not given): the command validates what was given with `build_section`, which
    fills the rest with the same defaults. `flags`: a field's flag where it is not ``--field-name``."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        meta, default = f.metadata, f.default
        kind = str(f.type).split("|")[0].strip()
        shown = "" if default is None else f" (default: {default:g})" if isinstance(default, float) else \
            f" (default: {default})"
        p.add_argument((flags or {}).get(name, flag_name(name)), dest=name, default=None,
                       type={"int": int, "float": float}.get(kind, str), choices=meta.get("choices"),
                       help=meta["doc"] + shown)


def seed_value(value: str) -> int:
    """A seed torch's generators take: a whole number from 0 to 2**63 - 1."""
    n = int(value)
    if not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**63 - 1, got {value}")
    return n


def seed(p: argparse.ArgumentParser, what: str = "seed") -> None:
    p.add_argument("--seed", type=seed_value, default=0, help=f"{what} (0)")


def json_out(p: argparse.ArgumentParser, what: str = "write the results to this JSON file",
             read_back: bool = False) -> None:
    """``--json``; unless the command reads the file back (`read_back`: the sweep resumes from it), an
    existing file is replaced only with ``--overwrite`` (`check_paths`), added here when missing."""
    if read_back:
        p.add_argument("--json", help=what)
        return
    p.add_argument("--json", help=what + " (an existing file is replaced only with --overwrite)")
    if "--overwrite" in p._option_string_actions:
        p._option_string_actions["--overwrite"].help += "; and an existing --json file"
    else:
        overwrite(p, "replace an existing --json file")


def overwrite(p: argparse.ArgumentParser, what: str = "replace output folders that are not empty") -> None:
    p.add_argument("--overwrite", action="store_true", help=what)


# Where a command's paths live in its parsed arguments: what it reads, and what it writes.
INPUTS = ("model", "models", "compressed", "teacher", "recipe", "runs")
OUTPUTS = ("out", "dense_out", "gguf_out", "json", "keep")
POSITIONAL = ("model", "models", "compressed", "runs")
# --json files that are also read back: the sweep resumes from its own file (and refuses any other)
JSON_READ_BACK = ("sweep",)
# commands whose --json has a Markdown twin beside it (`write_outputs`)
JSON_TWIN = ("compare", "bench", "sweep")


def check_writable_name(flag: str, path) -> None:
    """An output path a run can write at its end: a UTF-8 name (the reports and JSON files name it) and
    no file where one of its folders would go; one line before any work."""
    from smartprune.errors import OutputError

    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputError(f"{flag}: the path {str(path).encode('utf-8', 'backslashreplace').decode()} is not "
                          "valid UTF-8; name the output in UTF-8") from None
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def check_paths(args: argparse.Namespace) -> None:
    """Every path a command reads against every path it writes, before any work: ``~`` expanded once
    here (so the writers see the same path the checks saw), no output equal to, inside or around an
    input or another output, and an existing --json file replaced only with --overwrite."""
    from pathlib import Path

    from smartprune.errors import OutputError
    from smartprune.files import refuse_protected

    def expand(value):
        if isinstance(value, list):
            return [expand(v) for v in value]
        return str(Path(value).expanduser()) if isinstance(value, str) and value.startswith("~") else value

    for name in (*INPUTS, *OUTPUTS):
        if getattr(args, name, None) is not None:
            setattr(args, name, expand(getattr(args, name)))
    inputs: list[tuple[str, Path]] = []
    for name in INPUTS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and Path(v).exists():  # names (built-ins, hub ids, recipes) are not paths
                inputs.append((name, Path(v).resolve()))
    for name in OUTPUTS:
        if getattr(args, name, None):
            check_writable_name(flag_name(name), Path(getattr(args, name)))
    outputs = [(name, refuse_protected(Path(getattr(args, name)))) for name in OUTPUTS if getattr(args, name, None)]
    if getattr(args, "json", None) and args.command in JSON_TWIN:
        outputs.append(("json (its Markdown twin)", Path(args.json).resolve().with_suffix(".md")))
    def label(name: str) -> str:  # as the command line spells it
        return name.upper().rstrip("S") if name in POSITIONAL else flag_name(name)

    for i, (name, path) in enumerate(outputs):
        for other, where in inputs + outputs[i + 1:]:
            if path == where or path.is_relative_to(where) or where.is_relative_to(path):
                what = "input" if (other, where) in inputs else "output"
                raise OutputError(f"{label(name)} {path} overlaps {what} {label(other)} {where}: nothing is "
                                  "written on, inside or around another path of the run")
    if getattr(args, "json", None):
        files = [Path(args.json)] + ([Path(args.json).with_suffix(".md")] if args.command in JSON_TWIN else [])
        for path in files:
            if path.is_dir():
                raise OutputError(f"--json {path} is a folder; name a file")
            if path.exists() and not getattr(args, "overwrite", False) and args.command not in JSON_READ_BACK:
                raise OutputError(f"--json: {path} exists (use --overwrite to replace it)")


def eval_options(p: argparse.ArgumentParser, *groups: str) -> None:
    """Options shared by eval, generate and classify, by group: perplexity, classification, finetune,
    generation (every command gets --seed and --json)."""
    # Defaults None where `eval` must tell a flag given from one left alone (a flag for a kind of task the run does
    # not have is refused: `unused_eval_flags`); the settings' dataclasses hold the defaults the help names.
    if "perplexity" in groups:
        p.add_argument("--seqlen", type=positive, help="perplexity window length (1024)")
        p.add_argument("--stride", type=positive, help="sliding-window perplexity stride (default: non-overlapping)")
        p.add_argument("--limit", type=int, help="perplexity: only the first N windows")
    if "classification" in groups:
        p.add_argument("--examples", type=int, help="classification: at most N dev examples (a seeded subset)")
    if "mode" in groups:
        p.add_argument("--mode", help="classification: zero-shot (default) or finetune")
    if "finetune" in groups:
        p.add_argument("--max-train", type=int, help="fine-tune: training examples (1000)")
        p.add_argument("--epochs", type=int, help="fine-tune: epochs (1)")
        p.add_argument("--ft-seqlen", type=int, help="fine-tune: tokens per example (128)")
        p.add_argument("--ft-batch-size", type=int, help="fine-tune: examples per step (8)")
        p.add_argument("--lr", type=float, help="fine-tune: learning rate (3e-5)")
    if "generation" in groups:
        p.add_argument("--prompt", action="append", help="generation prompt (repeatable; default: the paper's "
                       "two, 'Once upon a time' and 'The Industrial Revolution')")
        p.add_argument("--lengths", type=positive, nargs="+",
                       help="generation: token counts the metrics are taken at (128 512)")
        p.add_argument("--sample", action="store_true", help="generation: seeded nucleus sampling, not greedy")
    if "device" in groups:
        device(p)
        compute_dtype(p, "the forward passes (and a fine-tune's steps)")
    if "resident" in groups:
        p.add_argument("--resident", choices=["dense", "compact"], default="dense",
                       help="how a compressed folder is held in memory: dense (default; unpacked once, fastest) or "
                       "compact (as stored, unpacked per product: smallest, slower; docs/compact-results.md)")
    seed(p)
    json_out(p)


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def eval_settings(args: argparse.Namespace):
    """EvalSettings from whichever option groups the command has (the others keep their defaults)."""
    from smartprune.evaluation.classify import FinetuneConfig
    from smartprune.evaluation.generation import GenerationConfig
    from smartprune.evaluation.suite import EvalSettings

    a = vars(args)
    try:
        finetune = FinetuneConfig(**{k: a[o] for k, o in (("max_train", "max_train"), ("epochs", "epochs"),
                                                          ("seqlen", "ft_seqlen"), ("batch_size", "ft_batch_size"),
                                                          ("lr", "lr"), ("seed", "seed")) if a.get(o) is not None})
        generation = GenerationConfig(**{k: v for k, v in (("prompts", tuple(a.get("prompt") or ())),
                                                           ("lengths", tuple(a.get("lengths") or ())),
                                                           ("greedy", not a.get("sample", False)),
                                                           ("seed", a["seed"])) if v != ()})
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return EvalSettings(**{k: a[k] for k in ("seqlen", "stride", "limit", "examples", "mode", "lm_eval_include",
                                            "lm_eval_allow_code")
                           if a.get(k) is not None}, finetune=finetune, generation=generation, seed=args.seed)


# eval's flags by the kind of task they act on (cli/shared.eval_options declares them)
EVAL_FLAGS = {"perplexity": ("seqlen", "stride", "limit"), "generation": ("prompt", "lengths", "sample"),
              "classification": ("mode", "max_train", "epochs", "ft_seqlen", "ft_batch_size", "lr"),
              "lm-eval": ("lm_eval_include",)}
FINETUNE_FLAGS = ("max_train", "epochs", "ft_seqlen", "ft_batch_size", "lr")


def unused_eval_flags(args: argparse.Namespace, kinds: set[str]) -> None:
    """One line for a flag `eval` was given that does nothing with these tasks (`kinds`: suite.kinds_of),
    before any model loads: a setting silently ignored reads as one that took effect."""
    def given(name: str) -> bool:
        return getattr(args, name, None) not in (None, False)

    for kind, names in EVAL_FLAGS.items():
        for name in names:
            if given(name) and kind not in kinds:
                raise DataError(f"{flag_name(name)} acts on {kind} tasks, and --tasks {args.tasks} has none")
    if given("examples") and not kinds & {"classification", "lm-eval"}:
        raise DataError(f"--examples acts on classification and lm-eval tasks, and --tasks {args.tasks} has none")
    if given("lm_eval_allow_code") and not given("lm_eval_include"):
        raise DataError("--lm-eval-allow-code lets an --lm-eval-include folder run code; no folder was given")
    for name in FINETUNE_FLAGS:
        if given(name) and args.mode != "finetune":
            raise DataError(f"{flag_name(name)} acts on --mode finetune (fine-tuning before scoring); the mode is "
                            f"{args.mode or 'zero-shot'}")
