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
