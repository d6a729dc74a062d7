"""Where data and caches live. Every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

from smartprune.errors import DataError

DATA_ENV = "SMARTPRUNE_DATA"
CACHE_ENV = "SMARTPRUNE_CACHE"
# switches read from the environment, and the values each takes (the first: unset or empty)
SWITCHES = {"SMARTPRUNE_KERNEL": ("1", "0", "avx2"),  # the packed decoding kernel: on, off, AVX2 loops on AVX-512
            "SMARTPRUNE_VERIFY": ("1", "0")}  # checksums of compressed folders (the CLI's --no-verify sets 0)


def switch(name: str) -> str:
    """The value of the environment switch `name` (its default when unset); an unknown value is one line,
    never silently read as the default."""
    known = SWITCHES[name]
    value = os.environ.get(name) or known[0]
    if value not in known:
        raise DataError(f"environment variable {name}={value!r} is not one of {', '.join(known)}")
    return value


def check_environment() -> None:
    """Every switch's value, before a command's work."""
    for name in SWITCHES:
        switch(name)
    check_cache_dir()


def check_cache_dir() -> None:
    """The cache folder ($SMARTPRUNE_CACHE) is a folder or can become one: the first of it and its parents
    that exists must be a folder (a file there fails every conversion and kernel build later, mid-run)."""
    path = cache_dir()
    first = next((p for p in (path, *path.parents) if p.exists()), None)
    if first is not None and not first.is_dir():
        raise DataError(f"cache folder {path} (${CACHE_ENV} or ~/.cache/smartprune) cannot be made: {first} is a "
                        "file, not a folder")


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








