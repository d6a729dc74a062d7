"""Bad input as a careless or hostile user gives it: one line, exit 2, before the expensive work."""

import json
import os
import shutil

import pytest

from .test_cli import _one_clean_line, run


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the expensive work started before the input was checked")


@pytest.fixture
def compressed_dir(model_dirs, use_data, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("c") / "c"
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "fpp-ff", "--out", out,
                       "--calib-samples", "4", "--calib-seqlen", "16")
    assert code == 0, err
    return out


def test_a_recipe_that_is_not_utf8(model_dirs, use_data, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"irc: {rate: 0.5}\n# caf\xe9 in Latin-1\n")
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", recipe, "--out", tmp_path / "o")
    assert code == 2 and "is not UTF-8 text" in _one_clean_line(err)
    assert not (tmp_path / "o").exists()


def test_a_run_file_that_is_not_utf8_or_not_an_object(tmp_path, capsys):
    bad = tmp_path / "run.json"
    bad.write_bytes(b'{"x": "\xff"}')
    code, _, err = run(capsys, "report", bad, "--out", tmp_path / "r")
    assert code == 2 and "is not UTF-8 text" in _one_clean_line(err)
    bad.write_text("[1, 2]")
    code, _, err = run(capsys, "report", bad, "--out", tmp_path / "r")
    assert code == 2 and "holds a JSON list" in _one_clean_line(err)


def test_an_output_that_cannot_be_written_is_refused_before_compressing(model_dirs, use_data, tmp_path, capsys,
                                                                        monkeypatch):
    import smartprune.runs.compress

    monkeypatch.setattr(smartprune.runs.compress, "compress", _fail_if_called)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", blocker / "out")
    assert code == 2 and "is not a writable folder" in _one_clean_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_under_a_read_only_folder_is_refused_before_compressing(model_dirs, use_data, tmp_path, capsys,
                                                                          monkeypatch):
    import smartprune.runs.compress

    monkeypatch.setattr(smartprune.runs.compress, "compress", _fail_if_called)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", locked / "new" / "out")
    finally:
        locked.chmod(0o755)
    assert code == 2 and "is not a writable folder" in _one_clean_line(err)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # GPT-2: an IndexError; RoPE: silently past its length
def test_windows_longer_than_the_model_positions(arch, model_dirs, use_data, tmp_path, capsys):
    code, _, err = run(capsys, "compress", model_dirs[arch], "--recipe", "irc", "--out", tmp_path / "o",
                       "--calib-seqlen", "500", "--calib-samples", "2")
    assert code == 2 and "calib-seqlen) 500 is longer than the model's 128 positions" in _one_clean_line(err)
    code, out, err = run(capsys, "compare", model_dirs[arch], "--methods", "dense,magnitude", "--calib-seqlen",
                         "500", "--seqlen", "64", "--limit", "1", "--tasks", "wikitext2")
    assert code == 2 and "--calib-seqlen 500 is longer" in _one_clean_line(err) and out == ""
    code, _, err = run(capsys, "recover", model_dirs[arch], "--teacher", "none", "--out", tmp_path / "r",
                       "--seqlen", "200", "--steps", "1")
    assert code == 2 and "recovery seqlen 200 is longer" in _one_clean_line(err)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json cannot be read"),
    (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[]"), "holds a JSON list"),
    (lambda d: (d / "smartprune.json").write_text("[1, 2]"), "smartprune.json holds a JSON list"),
    (lambda d: (d / "smartprune.json").write_bytes(b'{"format": "\xff"}'), "is not UTF-8 text"),
])
def test_a_damaged_compressed_folder(damage, message, compressed_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(compressed_dir, broken)
    damage(broken)
    code, _, err = run(capsys, "eval", broken, "--seqlen", "32", "--limit", "1")
    assert code == 2 and message in _one_clean_line(err)


def test_a_pickled_checkpoint_refused_by_the_safe_loader(model_dirs, use_data, tmp_path, capsys):
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(model_dirs["gpt2"] / "config.json", folder)
    torch.save({"weight": _Arbitrary()}, folder / "pytorch_model.bin")  # weights_only=True refuses a class
    code, _, err = run(capsys, "eval", folder, "--seqlen", "32", "--limit", "1")
    assert code == 2 and "the weights cannot be loaded (UnpicklingError" in _one_clean_line(err)


class _Arbitrary:
    pass


def test_a_config_that_asks_for_custom_code(model_dirs, use_data, tmp_path, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(model_dirs["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyModel"}
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "eval", folder, "--seqlen", "32", "--limit", "1")
    assert code == 2 and "never code from a model folder" in _one_clean_line(err)


def test_report_on_a_compressed_folder_works_from_another_folder(model_dirs, use_data, tmp_path, capsys,
                                                                 monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(model_dirs["llama"], work / "model")
    monkeypatch.chdir(work)
    code, _, err = run(capsys, "compress", "model", "--recipe", "fpp-ff", "--out", "c", "--calib-samples", "4",
                       "--calib-seqlen", "16")
    assert code == 0, err
    assert json.loads((work / "c" / "report.json").read_text())["model"] == str(work / "model")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "report", work / "c", "--out", tmp_path / "rep")
    assert code == 0, err
    assert (tmp_path / "rep" / "index.html").is_file()


def test_match_recipe_is_checked_before_any_model_work(model_dirs, use_data, capsys, monkeypatch):
    import smartprune.runs.compare

    monkeypatch.setattr(smartprune.runs.compare, "load_model", _fail_if_called)
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,magnitude", "--sparsity",
                       "match:papre", "--limit", "1", "--seqlen", "64")
    assert code == 2 and "unknown recipe 'papre' (did you mean 'paper'?)" in _one_clean_line(err)


def test_a_bad_second_eval_model_is_found_before_the_first_is_evaluated(model_dirs, use_data, tmp_path, capsys,
                                                                        monkeypatch):
    import smartprune.runs.compress

    monkeypatch.setattr(smartprune.runs.compress, "load_model", _fail_if_called)
    code, _, err = run(capsys, "eval", model_dirs["gpt2"], tmp_path / "missing", "--seqlen", "32", "--limit", "1")
    assert code == 2 and "model path not found" in _one_clean_line(err)
