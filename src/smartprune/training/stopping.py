"""Stopping a training loop at a step boundary when SIGINT or SIGTERM arrives.

Raising from the signal handler (Python's default for Ctrl-C) lands anywhere: between the optimizer
step and the step counter, inside a checkpoint write, inside a held lock. A checkpoint taken there
is not a state the loop ever passes through, so `--resume` after a signal would not continue bit for
bit. Here the handler only records the signal; the loop finishes the step it is in, every process
agrees to stop at the same step (`any_rank`), the checkpoint is written at that boundary, and then
the usual exception is raised (KeyboardInterrupt, or Terminated for SIGTERM) so the callers' clean-up
runs as before. A second signal in a single process raises at once (a user pressing Ctrl-C twice
does not want to wait); worker processes ignore repeats, because a launcher forwarding the signal
and a terminal sending it to the whole process group both arrive.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import TracebackType

from smartprune.errors import Terminated

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interruption(signum: int) -> KeyboardInterrupt:
    """The exception a signal stands for: Terminated (exit 143) for SIGTERM, else KeyboardInterrupt."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class StopAtBoundary:
    """Context manager: within it, SIGINT / SIGTERM set `signum` instead of raising (main thread only;
    elsewhere signals cannot be caught and nothing changes)."""

    def __init__(self, escalate: bool = True) -> None:
        self.escalate = escalate
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum and self.escalate:
            raise interruption(signum)
        if not self.signum:
            log.warning("%s: stopping after this step (a checkpoint is written there)%s", signal.Signals(signum).name,
                        "; again to stop at once" if self.escalate else "")
        self.signum = max(self.signum, signum)

    def __enter__(self) -> StopAtBoundary:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
