"""User-facing errors.

Every problem a user can cause (bad path, bad recipe, missing data) raises a subclass of
`SmartpruneError` with one sentence that names the offending path, key or value. The CLI prints
that sentence and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SmartpruneError(Exception):
    """An error caused by the user's input, reported as one line."""

    exit_code = 2


class ModelError(SmartpruneError):
    """The model could not be found, loaded or is of an unsupported architecture."""


class RecipeError(SmartpruneError):
    """A recipe is unknown, malformed, or holds an unknown key or out-of-range value."""


class DataError(SmartpruneError):
    """Evaluation or calibration data is missing or unusable."""


class OutputError(SmartpruneError):
    """An output location cannot be written as asked."""


class ArtifactError(SmartpruneError):
    """A saved compressed model is incomplete, corrupt or of an unknown format."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix when `word` is close to one of `options`, else ''."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DeviceError(SmartpruneError):
    """A device or compute precision was asked for that this machine cannot provide."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs (temporary folders removed, a recovery
    checkpoint written); the command line exits 143 instead of 130."""
