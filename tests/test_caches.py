"""Caches shared by concurrent runs: the converted-model cache written atomically, so two first runs at
once both end with one whole entry, and a conversion killed half-way leaves nothing a reader takes for a
model (real processes, a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONVERT = """
import sys, time
from pathlib import Path
import smartprune.storage.sources as s
if len(sys.argv) > 2:  # hold the conversion after its files are written, before they are renamed into place
    real = s.apply_umask
    s.apply_umask = lambda p: (Path(sys.argv[2]).write_text("holding"), time.sleep(60), real(p))
print(s.converted_gguf(Path(sys.argv[1])))
"""


@pytest.fixture
def gguf_file(tmp_path, gpt2_tokenizer):
    from smartprune.storage.gguf_writer import write_gguf
    from smartprune.testing import gguf_ready_model

    path = tmp_path / "m.gguf"
    write_gguf(gguf_ready_model("llama"), path, tokenizer=gpt2_tokenizer, gguf_type="f32")
    return path


def _start(gguf: Path, cache: Path, *hold: Path) -> subprocess.Popen:
    env = {**os.environ, "SMARTPRUNE_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", CONVERT, str(gguf), *map(str, hold)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models" / "gguf").iterdir())


def test_two_first_runs_at_once_share_one_whole_entry(gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    runs = [_start(gguf_file, cache) for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [o[1][-2000:] for o in outs]
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(folders) == 1 and len(_entries(cache)) == 1  # no temporary folder left behind
    AutoModelForCausalLM.from_pretrained(folders.pop())  # whole: it loads


def test_a_killed_conversion_leaves_no_entry_and_the_next_run_converts(gguf_file, tmp_path):
    cache, holding = tmp_path / "cache", tmp_path / "holding"
    run = _start(gguf_file, cache, holding)
    deadline = time.monotonic() + 120
    while not holding.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holding.exists(), run.communicate()[1][-2000:]
    run.send_signal(signal.SIGKILL)
    run.wait()
    left = _entries(cache)
    assert len(left) == 1 and left[0].startswith(".")  # only its temporary folder: no entry a reader takes
    again = _start(gguf_file, cache)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert Path(out.strip().splitlines()[-1]).name in _entries(cache)
    assert (Path(out.strip().splitlines()[-1]) / "config.json").is_file()


# The kernel build cache: a stand-in compiler (the real one takes ~30 s a build) that writes its output in two
# halves with a pause between, so a reader or a kill can land half-way. The library's cache key hashes the
# compile command, so the stand-in (one path; its pause read from the environment) gets its own entry.
FAKE_CXX = """#!{python}
import os, sys, time
out = sys.argv[sys.argv.index("-o") + 1]
with open(out, "wb") as f:
    f.write(b"first half ")
    f.flush()
    open(os.environ["FAKE_STARTED"], "w").close()
    time.sleep(float(os.environ["FAKE_PAUSE"]))
    f.write(b"second half")
"""
BUILD = "from smartprune.modules.kernels import build; print(build())"


def _build(cache: Path, pause: float, started: Path) -> subprocess.Popen:
    cxx = cache.parent / "fake-cxx"
    if not cxx.exists():
        cxx.write_text(FAKE_CXX.format(python=sys.executable))
        cxx.chmod(0o755)
    env = {**os.environ, "SMARTPRUNE_CACHE": str(cache), "CXX": str(cxx), "FAKE_PAUSE": str(pause),
           "FAKE_STARTED": str(started)}
    return subprocess.Popen([sys.executable, "-c", BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own group: a kill takes the compiler too


def test_two_kernel_builds_at_once_leave_one_whole_library(tmp_path):
    cache = tmp_path / "cache"
    runs = [_build(cache, 1.0, tmp_path / f"started-{i}") for i in range(2)]
    outs = [r.communicate(timeout=120) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    library = Path(paths.pop())
    assert library.read_bytes() == b"first half second half"  # whole: never the first half alone
    assert sorted(p.name for p in (cache / "kernels").iterdir()) == [library.name]  # no temporary file left


def test_a_killed_kernel_build_leaves_no_library_and_the_next_build_makes_it(tmp_path):
    cache, started = tmp_path / "cache", tmp_path / "started"
    run = _build(cache, 60.0, started)
    deadline = time.monotonic() + 60
    while not started.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), run.communicate()[1][-2000:]
    os.killpg(run.pid, signal.SIGKILL)  # the build and its compiler, half-way through the output
    run.wait()
    left = list((cache / "kernels").iterdir())
    assert left and all(p.name.startswith(".") for p in left)  # only the half-written temporary: nothing to load
    again = _build(cache, 0.0, tmp_path / "started-again")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err[-2000:]
    library = Path(out.strip().splitlines()[-1])
    assert library.read_bytes() == b"first half second half" and not library.name.startswith(".")
