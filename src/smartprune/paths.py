"""Where data and caches live. Every location can be overridden by an environment variable."""

from __future__ import annotations

import json
import os
from pathlib import Path

from smartprune.errors import DataError, SmartpruneError

DATA_ENV = "SMARTPRUNE_DATA"
CACHE_ENV = "SMARTPRUNE_CACHE"


def repo_root() -> Path:
    """The checkout this package lives in (src layout: <root>/src/smartprune)."""
    return Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The shared data folder: $SMARTPRUNE_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get(DATA_ENV)
    path = Path(env) if env else repo_root().parent / "shared" / "data"
    if not path.is_dir():
        raise DataError(f"data directory not found: {path} "
                        f"(set {DATA_ENV} to the folder that holds wikitext-2/, ptb/, glue/)")
    return path


def data_file(*parts: str) -> Path:
    """A file inside the data folder, with a message naming it and the variable when missing."""
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (set {DATA_ENV} to a folder that holds {'/'.join(parts)})")
    return path


def cache_dir() -> Path:
    """Where converted models are cached: $SMARTPRUNE_CACHE, else ~/.cache/smartprune."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "smartprune"


def read_text(path: Path, what: str, error: type[SmartpruneError] = DataError) -> str:
    """The UTF-8 text of a user's file, or one line naming it (missing, unreadable, not UTF-8)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc})") from None


def read_json(path: Path, what: str, error: type[SmartpruneError] = DataError) -> dict:
    """A user's JSON file parsed, or one line naming it; the top level must be an object."""
    try:
        data = json.loads(read_text(path, what, error))
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {type(data).__name__}, expected an object")
    return data


def umask() -> int:
    """This process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def apply_umask(folder: Path) -> None:
    """Give a folder made by mkdtemp (0700, files 0600 from mkstemp) the usual permissions."""
    mask = umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
