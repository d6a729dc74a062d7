"""Output folders: nothing of the user's is deleted, outputs never overlap, replacing is atomic."""

import os

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
