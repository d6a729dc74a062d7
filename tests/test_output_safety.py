"""Output folders: nothing of the user's is deleted, outputs never overlap, replacing is atomic."""

import os
from pathlib import Path

import pytest

from smartprune.errors import OutputError
from smartprune.files import atomic_dir

from .test_cli import _one_clean_line, run


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder holding a file of the user's, as the current folder."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("out", [".", "..", "/", "~"])
def test_compress_refuses_the_current_folder_its_parents_root_and_home(out, sandbox, model_dirs, use_data, capsys):
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", out, "--overwrite")
    assert code == 2 and "refusing output folder" in _one_clean_line(err)
    assert (sandbox / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("dense", ["out", "out/inner", "."])
def test_dense_out_may_not_overlap_out(dense, sandbox, model_dirs, use_data, capsys):
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", "out",
                       "--dense-out", dense, "--overwrite")
    assert code == 2, err
    assert "overlap" in _one_clean_line(err) or "refusing" in err
    assert not (sandbox / "out").exists() and (sandbox / "precious.txt").exists()


def test_out_inside_the_input_model_is_refused(model_dirs, use_data, capsys):
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out",
                       model_dirs["llama"] / "compressed")
    assert code == 2 and "overlap" in _one_clean_line(err)


def test_replacing_keeps_the_old_output_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.rename

    def failing_move_in(src, dst):  # the old folder is aside, the new one fails to move in
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", failing_move_in)
    with pytest.raises(OSError, match="disk full"), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(os, "rename", real)
    assert (target / "old.txt").read_text() == "old"  # the previous output is back
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left beside it
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    with pytest.raises(OutputError, match="not empty"), atomic_dir(target, overwrite=False):
        pass


def test_a_folder_missing_a_tensor_is_refused_not_filled_with_random_weights(model_dirs, use_data, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["llama"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    dropped = next(k for k in tensors if "mlp.down_proj" in k)
    del tensors[dropped]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, "eval", broken, "--seqlen", "32", "--limit", "1")
    assert code == 2 and "missing keys" in _one_clean_line(err) and dropped in err


def test_a_compressed_folder_without_its_manifest_is_refused(model_dirs, use_data, tmp_path, capsys):
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "fpp-ff", "--out", tmp_path / "c",
                       "--calib-samples", "4", "--calib-seqlen", "16")
    assert code == 0, err
    (tmp_path / "c" / "smartprune.json").unlink()
    code, _, err = run(capsys, "eval", tmp_path / "c", "--seqlen", "32", "--limit", "1")
    assert code == 2 and "smartprune.json is missing" in _one_clean_line(err)


def test_non_finite_weights_are_reported(caplog):
    import logging

    import torch

    from smartprune.modules.masked import report_non_finite

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with caplog.at_level(logging.WARNING):
        assert report_non_finite(model, "m") == 1
    assert "non-finite" in caplog.text and "weight" in caplog.text


@pytest.mark.parametrize("out", [".", ".."])
def test_report_refuses_the_current_folder_and_its_parents(out, sandbox, tmp_path, capsys):
    run_file = tmp_path / "eval.json"
    run_file.write_text('{"results": {}, "models": ["m"], "by_model": {"m": {}}, "settings": {}}')
    code, _, err = run(capsys, "report", run_file, "--out", out, "--overwrite")
    assert code == 2 and "refusing output folder" in _one_clean_line(err)
    assert (sandbox / "precious.txt").read_text() == "keep me"


def test_an_output_that_appears_during_the_run_is_never_replaced(tmp_path):
    """Two runs writing the same new --out, neither with --overwrite: the second to finish keeps the
    first one's folder and says where its own result is."""
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared during this run") as err, \
            atomic_dir(target, overwrite=False) as tmp:
        (tmp / "mine.txt").write_text("mine")
        target.mkdir()  # the other run finished first
        (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    kept = Path(str(err.value).rsplit(" ", 1)[1])
    assert (kept / "mine.txt").read_text() == "mine" and kept.parent.parent == tmp_path


def test_temporary_folders_of_killed_runs_are_removed_at_the_next_run(tmp_path, caplog):
    import logging
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = [tmp_path / f".out.tmp-{pid}-abc", tmp_path / f".out.old-{pid}-def"]
    live = tmp_path / f".out.tmp-{os.getpid()}-ghi"  # this process's: still being written
    other = tmp_path / f".other.tmp-{pid}-jkl"  # another output's: not ours to judge here
    for d in (*stale, live, other):
        d.mkdir()
        (d / "x").write_text("x")
    with caplog.at_level(logging.WARNING, logger="smartprune.files"), atomic_dir(tmp_path / "out", False) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not any(d.exists() for d in stale) and live.is_dir() and other.is_dir()
    assert sum("killed" in r.getMessage() for r in caplog.records) == 2


def test_an_output_set_aside_by_a_killed_run_is_put_back(tmp_path, caplog):
    """Killed between moving the previous output aside and moving the new one in: the next run finds
    the previous output where it was, not deleted with the leftovers."""
    import subprocess
    import sys

    from smartprune.files import remove_stale

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    aside = tmp_path / f".out.old-{pid}-abc" / "out"
    aside.mkdir(parents=True)
    (aside / "model.txt").write_text("the user's previous output")
    remove_stale(tmp_path / "out")
    assert (tmp_path / "out" / "model.txt").read_text() == "the user's previous output"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_output_lands_on_or_inside_an_input(model_dirs, use_data, tmp_path, capsys):
    """The data-loss paths found by hand: each refused in one line before any work, the input untouched."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(model_dirs["llama"], teacher)
    before = _snapshot(teacher)
    run_file = tmp_path / "eval.json"
    run_file.write_text('{"results": {}, "models": ["m"], "by_model": {"m": {}}, "settings": {}}')
    cases = [
        # recover's dense twin onto the teacher (the original dense model)
        ("recover", model_dirs["llama"], "--teacher", teacher, "--out", tmp_path / "r", "--dense-out", teacher,
         "--overwrite", "--steps", "1"),
        # eval's --json onto a file of the model it reads
        ("eval", teacher, "--tasks", "wikitext2", "--json", teacher / "config.json"),
        # report's --out onto the run it reads
        ("report", run_file, "--out", run_file, "--overwrite"),
        # compare's measured models kept inside the model folder
        ("compare", teacher, "--methods", "dense", "--keep", teacher / "kept", "--measure", "speed"),
        # the Markdown twin of bench's --json onto the --json of ... itself (x.md)
        ("bench", teacher, "--json", tmp_path / "b.md"),
    ]
    for argv in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and "overlaps" in _one_clean_line(err), (argv[0], err)
    assert _snapshot(teacher) == before


def test_an_existing_json_file_is_replaced_only_with_overwrite(model_dirs, use_data, tmp_path, capsys):
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    argv = ("eval", model_dirs["llama"], "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16", "--json", mine)
    code, _, err = run(capsys, *argv)
    assert code == 2 and "exists (use --overwrite" in _one_clean_line(err)
    assert mine.read_text() == '{"mine": true}'
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert "perplexity" in mine.read_text() or "wikitext2" in mine.read_text()
    code, _, err = run(capsys, "eval", model_dirs["llama"], "--tasks", "wikitext2", "--json", tmp_path)
    assert code == 2 and "is a folder" in _one_clean_line(err)


def test_a_tilde_in_an_output_means_the_home_folder(model_dirs, use_data, tmp_path, monkeypatch, capsys):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    code, _, err = run(capsys, "eval", model_dirs["llama"], "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16",
                       "--json=~/e.json")
    assert code == 0, err
    assert (home / "e.json").is_file() and not (work / "~").exists()


# ---- a full disk: one line, nothing half-written -----------------------------------------------------
def _full_disk(*args, **kwargs):
    """What safetensors raises when the file system is full (its own type, the OS's words)."""
    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_while_compress_writes_is_one_line_and_leaves_nothing(sandbox, model_dirs, use_data, capsys,
                                                                         monkeypatch):
    import smartprune.storage.save as storage_save

    monkeypatch.setattr(storage_save, "save_file", _full_disk)
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", "out",
                       "--calib-samples", "4", "--calib-seqlen", "16")
    assert code == 2 and "no space left on the device for out" in _one_clean_line(err)
    assert sorted(p.name for p in sandbox.iterdir()) == ["precious.txt"]  # no output, no temporary folder


def test_a_full_disk_while_writing_json_keeps_the_old_file(sandbox, monkeypatch):
    import errno

    from smartprune.files import write_json

    (sandbox / "r.json").write_text("{}\n")
    real = os.fdopen

    class Full:
        def __init__(self, fd, *a, **k):
            self.f = real(fd, *a, **k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("smartprune.files.os.fdopen", Full)
    with pytest.raises(OutputError, match="no space left on the device"):
        write_json(sandbox / "r.json", {"a": 1})
    assert (sandbox / "r.json").read_text() == "{}\n"
    assert sorted(p.name for p in sandbox.iterdir()) == ["precious.txt", "r.json"]


def test_too_little_free_space_is_refused_before_the_work(sandbox, model_dirs, use_data, capsys, monkeypatch):
    import shutil

    import smartprune.runs.pipeline as runs_compress

    monkeypatch.setattr("smartprune.files.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    monkeypatch.setattr(runs_compress, "load_model", lambda *a, **k: pytest.fail("loaded before the space check"))
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", "out")
    assert code == 2 and "MB free on its device" in _one_clean_line(err)
    assert not (sandbox / "out").exists()


@pytest.mark.parametrize("kind", ["llama"])
def test_a_full_disk_for_checkpoints_warns_once_and_training_goes_on(compressed, gpt2_tokenizer, use_data, tmp_path,
                                                                     monkeypatch, caplog):
    import errno

    import smartprune.training.checkpoint as checkpoint
    from smartprune.recipes.schema import RecoverConfig
    from smartprune.training.recover import recover

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    model, teacher = compressed
    cfg = RecoverConfig(steps=3, checkpoint_minutes=0.0, seqlen=32, batch_size=2, eval_windows=1)
    import logging

    ours = logging.getLogger("smartprune")  # the CLI stops its records at this logger (propagate off)
    ours.addHandler(caplog.handler)
    try:
        r = recover(model, gpt2_tokenizer, cfg, teacher=teacher, checkpoint_dir=tmp_path / "ck", progress=False)
    finally:
        ours.removeHandler(caplog.handler)
    assert r["steps"] == 3
    assert sum("no space for the checkpoint" in m for m in caplog.messages) == 1
    assert not any((tmp_path / "ck").iterdir())  # no partial checkpoint left
