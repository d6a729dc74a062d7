"""Output folders: nothing of the user's is deleted, outputs never overlap, replacing is atomic."""

import os

import pytest

from smartprune.artifact import atomic_dir
from smartprune.errors import OutputError

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
    real = os.replace
    calls = []

    def failing_second_move(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder is aside, the new one fails to move in
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_move)
    with pytest.raises(OSError, match="disk full"), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(os, "replace", real)
    assert (target / "old.txt").read_text() == "old"  # the previous output is back
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left beside it
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    with pytest.raises(OutputError, match="not empty"), atomic_dir(target, overwrite=False):
        pass
