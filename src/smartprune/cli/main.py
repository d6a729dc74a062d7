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

from smartprune.cli import compression, measurement, studies
from smartprune.cli.shared import Parser, check_paths
from smartprune.errors import SmartpruneError, Terminated

log = logging.getLogger("smartprune")

# The commands in the order `smartprune --help` lists them: each module says its parser beside its run.
COMMANDS = (
    compression.add_recipes, compression.add_compress, compression.add_demo, compression.add_recover,
    studies.add_compare, measurement.add_eval, measurement.add_generate, measurement.add_classify,
    measurement.add_bench, studies.add_sweep, studies.add_report, compression.add_train,
)


def build_parser() -> Parser:
    p = Parser(prog="smartprune", description="Compress causal language models with the smart-pruning methods "
               "of Belhaouari & Kraidia (2025), and measure what it costs and buys.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--no-verify", action="store_true", help="read compressed folders whose weights file does not "
                   "match, or whose manifest does not record, its SHA-256 (damaged or hand-edited files load anyway)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.quiet)
    import os

    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    if args.no_verify:  # read by `storage.load`, also in the processes a command starts
        os.environ["SMARTPRUNE_VERIFY"] = "0"
    _quiet_libraries()
    func: Callable[[argparse.Namespace], int] = args.func
    previous = _terminate_like_interrupt()
    try:
        from smartprune.paths import check_environment

        check_environment()  # a switch with an unknown value is one line, before any work
        check_paths(args)  # what it reads against what it writes, before any work
        if getattr(args, "device", None) is not None:  # resolved once, here at the edge: bad names fail first
            from smartprune.device import resolve_device

            args.device = resolve_device(args.device)
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
    for name in ("huggingface_hub", "transformers", "urllib3", "httpx", "lm_eval", "datasets"):
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
