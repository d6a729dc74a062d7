"""Reading and writing the user's files safely: outputs checked before the work, folders written
atomically, JSON and text written by replacement, and the process umask applied to what we create."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from smartprune.errors import DataError, OutputError, SmartpruneError


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output location that already holds something, unless `overwrite`; refuse always a
    location whose replacement would delete what is not ours: the file-system root, the home folder,
    the current folder or one of its ancestors (``.``, ``..``)."""
    path = Path(path)
    resolved, cwd = path.expanduser().resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd.is_relative_to(resolved):
        raise OutputError(f"refusing output folder {path}: it is the root, the home folder, or the current "
                          "folder or one of its parents; name a new folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output folder {path} is not empty (use --overwrite to replace it)")
    parent = resolved.parent
    while not parent.exists():  # the folders still to be made go into the nearest existing one
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output folder {path}: {parent} is not a writable folder")


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse an output file that exists (unless `overwrite`), that names a folder, or whose folder
    does not exist or cannot be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise OutputError(f"output file {path} exists (use --overwrite to replace it)")
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: {parent} is not a writable folder")


def check_outputs_apart(*paths: Path | str | None) -> None:
    """Refuse two locations of one run (outputs, the input model) that are equal or nested."""
    named = [Path(p).expanduser().resolve() for p in paths if p is not None]
    for i, a in enumerate(named):
        for b in named[i + 1:]:
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise OutputError(f"{a} and {b} overlap: an output may not be, contain or lie inside the other "
                                  "output or the input model")


@contextmanager
def atomic_dir(target: Path, overwrite: bool):
    """Yield a temporary folder beside `target`; move it into place only if the block succeeds. An
    existing `target` is moved aside first and deleted only once the new one is in place, so no
    failure loses both."""
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        apply_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous output back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and move it into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the user's umask decides
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(value):
    """JSON for what json does not know: a torch.device and a path as their names, numbers (numpy,
    tensors) as floats."""
    if type(value).__name__ == "device" or isinstance(value, os.PathLike):
        return str(value)
    return float(value)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=_plain) + "\n")


def write_results(folder: Path, stem: str, data: dict, markdown: str) -> None:
    """A measurement as ``folder/stem.json`` and its readable twin ``folder/stem.md`` (benchmark scripts)."""
    write_json(folder / f"{stem}.json", data)
    write_text(folder / f"{stem}.md", markdown)


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


