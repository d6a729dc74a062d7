"""Reading and writing the user's files safely: outputs checked before the work, folders written
atomically, JSON and text written by replacement, and the process umask applied to what we create."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from smartprune.errors import DataError, OutputError, SmartpruneError

log = logging.getLogger(__name__)


def disk_full(exc: BaseException) -> bool:
    """The write failed because the file system is full (or the user's quota is spent). Libraries that
    write in native code (safetensors) report it in their own exception type, with the OS's words."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, Exception) and ("No space left on device" in str(exc) or "os error 28" in str(exc))


def free_bytes(path: Path) -> int | None:
    """Free space on the file system that holds `path` (or would: its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


class NoSpace(OutputError):
    """A write that the file system could not hold (its temporary files are removed)."""


def no_space(target: Path) -> NoSpace:
    free = free_bytes(target)
    left = "" if free is None else f" ({free / 1e6:,.0f} MB free)"
    return NoSpace(f"no space left on the device for {target}{left}; nothing was written, the temporary "
                       "files are removed")


def check_free_space(target: Path, need: int, likely: int, what: str) -> None:
    """Before the work: refuse when `target`'s file system has less than `need` bytes free (a bound the
    output cannot be smaller than), warn when it has less than the `likely` size."""
    free = free_bytes(Path(target).expanduser())
    if free is None:
        return
    if free < need:
        raise OutputError(f"{target}: {free / 1e6:,.0f} MB free on its device, and {what} needs at least "
                          f"{need / 1e6:,.0f} MB; free some space or choose another place")
    if free < likely:
        log.warning("%s: %s MB free on its device; %s may need up to %s MB", target, f"{free / 1e6:,.0f}", what,
                    f"{likely / 1e6:,.0f}")


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an output location that already holds something, unless `overwrite`; refuse always a
    location whose replacement would delete what is not ours: the file-system root, the home folder,
    the current folder or one of its ancestors (``.``, ``..``)."""
    path = Path(path)
    resolved = refuse_protected(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"output folder {path} is not empty (use --overwrite to replace it)")
    parent = resolved.parent
    while not parent.exists():  # the folders still to be made go into the nearest existing one
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output folder {path}: {parent} is not a writable folder")


# room kept in a file name for what the writers add around an output's name (``.NAME.tmp-PID-XXXXXXXX``)
NAME_ROOM = 32


def refuse_protected(path: Path) -> Path:
    """Refuse, as an output, the file-system root, the home folder, or the current folder or one of its
    parents (``.``, ``..``); a dangling symbolic link; a name too long for the file system once the
    writers' temporary prefix is added. The resolved path otherwise."""
    path = Path(path).expanduser()
    for part in path.parts:  # first: a name too long makes every later look at the path fail
        if len(os.fsencode(part)) + NAME_ROOM > 255:  # NAME_MAX of the common Linux file systems
            raise OutputError(f"output name '{part[:40]}...' is {len(os.fsencode(part))} bytes long; the file system "
                              f"takes {255 - NAME_ROOM} at most for an output's name")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"output {path} is a symbolic link to {os.readlink(path)}, which does not exist; name "
                          "another path or remove the link")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd.is_relative_to(resolved):
        raise OutputError(f"refusing output folder {path}: it is the root, the home folder, or the current "
                          "folder or one of its parents; name a new folder")
    return resolved


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse an output file that exists (unless `overwrite`), that names a folder, or whose folder
    does not exist or cannot be written."""
    path = Path(path).expanduser()
    refuse_protected(path)
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
    """Yield a temporary folder beside `target`; move it into place only if the block succeeds.

    Without `overwrite` the move is create-exclusive: a folder that appeared at `target` during the run
    (another run writing the same output) is never replaced; this run's result is kept beside it and
    named in the error. With `overwrite` an existing `target` is moved aside first and deleted only once
    the new one is in place, so no failure loses both. Leftovers of runs that were killed (``.NAME.tmp-PID-*``
    and ``.NAME.old-PID-*`` of a process that no longer exists) are removed first, and said."""
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    old = None
    try:
        yield tmp
        apply_umask(tmp)
        if overwrite and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / target.name)
        _move_exclusive(tmp, target)
    except BaseException as exc:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous output back
        if disk_full(exc) or isinstance(exc, NoSpace):  # the latter: a file written inside the folder
            shutil.rmtree(tmp, ignore_errors=True)  # before measuring what is free
            raise no_space(target) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _move_exclusive(tmp: Path, target: Path) -> None:
    """rename(2) onto `target`: it fails when `target` is a folder that is not empty, so what appeared
    there meanwhile is never replaced (an empty folder is, which loses nothing)."""
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if not target.exists():
            raise
        kept = Path(tempfile.mkdtemp(prefix=f"{target.name}.conflict-", dir=target.parent))
        os.replace(tmp, kept / target.name)
        raise OutputError(f"output {target} appeared during this run (another run writing it?) and was not "
                          f"replaced; this run's result is in {kept / target.name}") from exc


def remove_stale(target: Path) -> list[Path]:
    """Remove the temporary folders beside `target` that a killed run of ours left (their names carry
    the writing process's id; a live process's are left alone), and say so."""
    import logging
    import re

    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    removed = []
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        m = pattern.match(entry.name)
        if m is None or not entry.is_dir() or _alive(int(m.group(2))):
            continue
        aside = entry / target.name
        if m.group(1) == "old" and aside.exists() and not target.exists():
            # killed between setting the previous output aside and moving the new one in: put it back
            os.replace(aside, target)
            logging.getLogger(__name__).warning("restored %s from %s, where a killed run had set it aside",
                                                target, entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        logging.getLogger(__name__).warning("removed %s, left by an earlier run that was killed", entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and move it into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the user's umask decides
        os.replace(tmp, path)
    except OSError as exc:
        if disk_full(exc):
            os.unlink(tmp)
            raise no_space(path) from None
        raise
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
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply to be read") from None
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


