"""Bad input as a careless or hostile user gives it: one line, exit 2, before the expensive work."""

import json
import os
import re
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
    import smartprune.runs.pipeline

    monkeypatch.setattr(smartprune.runs.pipeline, "compress", _fail_if_called)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", blocker / "out")
    assert code == 2 and "a-file is a file, not a folder" in _one_clean_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_under_a_read_only_folder_is_refused_before_compressing(model_dirs, use_data, tmp_path, capsys,
                                                                          monkeypatch):
    import smartprune.runs.pipeline

    monkeypatch.setattr(smartprune.runs.pipeline, "compress", _fail_if_called)
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
                       "--train-seqlen", "200", "--steps", "1")
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
    import smartprune.runs.evaluate

    monkeypatch.setattr(smartprune.runs.evaluate, "load_model", _fail_if_called)
    code, _, err = run(capsys, "eval", model_dirs["gpt2"], tmp_path / "missing", "--seqlen", "32", "--limit", "1")
    assert code == 2 and "model path not found" in _one_clean_line(err)


def _damaged_folder(kind: str, model_dirs, tmp_path):
    """A model path damaged in one way (the cases found by hand), and what its error says."""
    from safetensors.torch import load_file, save_file

    if kind in ("garbage gguf", "empty gguf"):
        path = tmp_path / "m.gguf"
        path.write_bytes(os.urandom(512) if kind == "garbage gguf" else b"")
        return path, "not a GGUF file"
    path = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], path)
    if kind == "mis-shaped tensor":
        tensors = load_file(str(path / "model.safetensors"))
        key = next(k for k in tensors if "q_proj" in k)
        tensors[key] = tensors[key][:, :3].contiguous()
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path, "stored [32, 3]"
    if kind == "int64 weight":  # transformers would cast it to float32 and run it
        tensors = load_file(str(path / "model.safetensors"))
        key = next(k for k in tensors if "q_proj" in k)
        tensors[key] = (tensors[key] * 100).long()
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path, "is stored as I64, not floating point"
    if kind == "garbage tokenizer":
        (path / "tokenizer.json").write_text("garbage{")
        return path, "tokenizer files cannot be read"
    if kind == "terabyte manifest":  # a compressed folder whose manifest asks for 4 TiB
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import smartprune
        from smartprune.data import Calibration
        from smartprune.recipes.schema import build_recipe
        from smartprune.storage.save import save

        model = AutoModelForCausalLM.from_pretrained(path)
        calib = Calibration(torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16)), "test")
        smartprune.compress(model, None, build_recipe({"magnitude": {"sparsity": 0.5}}, "t", "test"), calib=calib,
                            progress=False)
        save(model, tmp_path / "c", tokenizer=AutoTokenizer.from_pretrained(path))
        manifest = json.loads((tmp_path / "c" / "smartprune.json").read_text())
        name = next(k for k, rec in manifest["modules"].items() if "shape" in rec)
        manifest["modules"][name]["shape"] = [2**20, 2**20]
        (tmp_path / "c" / "smartprune.json").write_text(json.dumps(manifest))
        return tmp_path / "c", "GiB of float32 values"
    config = json.loads((path / "config.json").read_text())  # a config that asks for terabytes
    config["hidden_size"] = 10**9
    (path / "config.json").write_text(json.dumps(config))
    return path, "more than this machine's"


@pytest.mark.parametrize("kind", ["garbage gguf", "empty gguf", "mis-shaped tensor", "garbage tokenizer",
                                  "terabyte config", "terabyte manifest", "int64 weight"])
def test_a_damaged_model_is_one_line(kind, model_dirs, use_data, tmp_path, capsys):
    path, message = _damaged_folder(kind, model_dirs, tmp_path)
    code, _, err = run(capsys, "eval", path, "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16")
    assert code == 2 and message in _one_clean_line(err), err


def test_a_seed_beyond_what_generators_take_is_refused_by_the_parser(model_dirs, capsys):
    with pytest.raises(SystemExit) as stop:
        run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", "o", "--seed", str(2**70))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "from 0 to 2**63 - 1" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--out", "x" * 300], "bytes long"),
    (["--out", "DANGLING"], "which does not exist"),
])
def test_bad_compress_arguments_are_one_line(argv, message, model_dirs, use_data, tmp_path, capsys, monkeypatch):
    import smartprune.runs.pipeline

    monkeypatch.setattr(smartprune.runs.pipeline, "compress", _fail_if_called)
    monkeypatch.chdir(tmp_path)
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "DANGLING")
    argv = ["--out", "o", *argv] if "--out" not in argv else argv
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", *argv)
    assert code == 2 and message in _one_clean_line(err), err


def test_a_model_without_a_tokenizer_is_refused_before_compressing(model_dirs, use_data, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], folder)
    for f in folder.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    code, _, err = run(capsys, "compress", folder, "--recipe", "irc", "--out", tmp_path / "o")
    assert code == 2 and "no tokenizer files" in _one_clean_line(err)
    assert not (tmp_path / "o").exists()


def test_sweep_rates_that_never_end_are_one_line(model_dirs, use_data, capsys):
    for rates in ("0:inf:0.1", "0:1:1e-9", "nan:1:0.1"):
        code, _, err = run(capsys, "sweep", model_dirs["llama"], "--method", "wanda", "--rates", rates)
        assert code == 2 and "start:stop:step" in _one_clean_line(err), rates


@pytest.mark.parametrize("argv, message", [(["--examples", "4"], "--examples acts on classification"),
                                           (["--tasks", "sst2", "--limit", "2"], "--limit acts on perplexity")])
def test_sweep_flags_for_tasks_it_does_not_evaluate_are_one_line(argv, message, model_dirs, use_data, capsys):
    code, _, err = run(capsys, "sweep", model_dirs["llama"], "--method", "magnitude", "--rates", "0.5", *argv)
    assert code == 2 and message in _one_clean_line(err), err


@pytest.mark.parametrize("damage, message", [
    ("no weights", "is missing"),
    ("huge shape", "GiB of float32 values"),
])
def test_a_compressed_folder_damaged_in_its_sizes(damage, message, compressed_dir, tmp_path, capsys):
    folder = tmp_path / "c"
    shutil.copytree(compressed_dir, folder)
    if damage == "no weights":
        (folder / "model.safetensors").unlink()
    else:  # a manifest size that would make the reader allocate terabytes
        manifest = json.loads((folder / "smartprune.json").read_text())
        rec = next(r for r in manifest["modules"].values() if "shape" in r)
        rec["shape"] = [10**7, 10**7]
        (folder / "smartprune.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "--no-verify", "eval", folder, "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16")
    assert code == 2 and message in _one_clean_line(err), err


@pytest.mark.parametrize("kind", ["llama"])
@pytest.mark.parametrize("damage", ["step a string", "another model", "another seed"])
def test_a_checkpoint_is_checked_field_by_field_before_it_is_used(damage, compressed, gpt2_tokenizer, use_data,
                                                                 tmp_path):
    import copy

    import torch

    from smartprune.errors import DataError
    from smartprune.recipes.schema import RecoverConfig
    from smartprune.testing import family_model
    from smartprune.training.recover import recover

    model, teacher = compressed
    cfg = RecoverConfig(steps=2, seqlen=16, batch_size=2, eval_windows=1, checkpoint_minutes=0.0)

    def stop(state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(model), gpt2_tokenizer, cfg, teacher=teacher, checkpoint_dir=tmp_path, on_step=stop,
                progress=False)
    path = tmp_path / "recover-checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    if damage == "step a string":
        ckpt["state"]["step"] = "1"
        student, message = copy.deepcopy(model), "state 'step' is '1'"
    elif damage == "another model":  # the same settings, another model: its weights do not fit this one
        student, message = family_model("qwen3", vocab=model.config.vocab_size), "another model's weights"
    else:  # its generator state would silently replace the new seed's draws
        student, message = copy.deepcopy(model), r"made with other recovery settings \(seed\)"
    torch.save(ckpt, path)
    with pytest.raises(DataError, match=message):
        recover(student, gpt2_tokenizer, cfg, teacher=teacher, checkpoint_dir=tmp_path, resume=True, progress=False,
                seed=5 if damage == "another seed" else 0)


@pytest.mark.parametrize("content", [b"garbage" * 10, b""])
def test_a_damaged_recovery_checkpoint_is_one_line(content, model_dirs, use_data, tmp_path, capsys):
    ckpt = tmp_path / ".r.recover-checkpoint" / "recover-checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(content)
    code, _, err = run(capsys, "recover", model_dirs["llama"], "--teacher", "none", "--out", tmp_path / "r",
                       "--steps", "2", "--train-seqlen", "16", "--batch-size", "2", "--eval-windows", "1", "--resume")
    assert code == 2 and "remove it and run without --resume" in _one_clean_line(err), err


@pytest.mark.parametrize("command", ["compress", "compare", "sweep"])
def test_a_one_token_calibration_window_is_refused_on_the_command_line(command, model_dirs, use_data, tmp_path,
                                                                       capsys, monkeypatch):
    """The recipe refuses `calibration: {seqlen: 1}`; the flag that overrides it refused nothing."""
    import smartprune.storage.sources as sources

    monkeypatch.setattr(sources, "load_model", _fail_if_called)
    extra = {"compress": ["--recipe", "irc", "--out", tmp_path / "o"], "compare": [], "sweep": ["--recipe", "irc"]}
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal: usage, then the one error line
        run(capsys, command, model_dirs["llama"], *extra[command], "--calib-seqlen", "1")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "expected a window of at least 2 tokens, got 1" in err.splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_the_library_validates_calibration_overrides_like_the_recipe(model_dirs, use_data, tmp_path):
    from smartprune.errors import RecipeError
    from smartprune.runs.compress import compress_model

    with pytest.raises(RecipeError, match=r"calibration.seqlen: 1 is outside \[2"):
        compress_model(str(model_dirs["llama"]), "irc", out=tmp_path / "o", calib_seqlen=1)
    assert not (tmp_path / "o").exists()


def test_a_gguf_file_cut_anywhere_is_one_line(model_dirs, use_data, tmp_path, capsys):
    """A download cut short: the magic alone, inside the header, the metadata or the tensor data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smartprune.storage.gguf_writer import write_gguf

    whole = tmp_path / "whole.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), whole,
               tokenizer=AutoTokenizer.from_pretrained(model_dirs["llama"]), gguf_type="f32")
    blob = whole.read_bytes()
    for n in (4, 12, 200, len(blob) // 2, len(blob) - 7):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(blob[:n])
        code, _, err = run(capsys, "eval", cut, "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16")
        assert code == 2 and "cannot be read as a GGUF model" in _one_clean_line(err), (n, err[-500:])


def test_a_gguf_file_missing_tensors_is_refused_not_filled_with_random_weights(model_dirs, use_data, tmp_path,
                                                                              capsys):
    """A real export with its tensor count patched to 0 (and one with a tensor's name changed): every
    weight transformers would leave at its random initial value is named, exit 2, nothing evaluated."""
    import struct

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smartprune.storage.gguf_writer import write_gguf

    whole = tmp_path / "whole.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), whole,
               tokenizer=AutoTokenizer.from_pretrained(model_dirs["llama"]), gguf_type="f32")
    blob = bytearray(whole.read_bytes())
    none = tmp_path / "none.gguf"
    none.write_bytes(bytes(blob[:8] + struct.pack("<Q", 0) + blob[16:]))
    renamed = tmp_path / "renamed.gguf"
    at = blob.index(b"blk.1.ffn_up.weight")
    renamed.write_bytes(bytes(blob[:at] + b"blk.1.ffn_up.wEight" + blob[at + 19:]))
    for path in (none, renamed):
        code, out, err = run(capsys, "eval", path, "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16")
        line = err.strip().splitlines()[-1]  # after transformers' conversion bar (the load's own progress)
        assert "Traceback" not in err and line.startswith("smartprune: error:")
        assert code == 2 and "in the weights" in line and "the GGUF file is incomplete" in line, line
        assert "perplexity" not in out


@pytest.mark.parametrize("case", ["json under a file", "non-UTF-8 out", "gguf type without gguf out",
                                  "unknown kernel switch", "unknown verify switch", "cache under a file",
                                  "offload on a CPU"])
def test_settings_and_paths_that_cannot_work_are_one_line_before_any_work(case, model_dirs, use_data, tmp_path,
                                                                         capsys, monkeypatch):
    import os

    import smartprune.runs.evaluate
    import smartprune.runs.pipeline

    for module in (smartprune.runs.pipeline, smartprune.runs.evaluate):
        monkeypatch.setattr(module, "load_model", _fail_if_called)
    (tmp_path / "afile").write_text("a file")
    model = str(model_dirs["llama"])
    argv, message = {
        "json under a file": (["eval", model, "--tasks", "wikitext2", "--json", tmp_path / "afile" / "x.json"],
                              "is a file, not a folder"),
        "non-UTF-8 out": (["compress", model, "--recipe", "irc", "--out",
                           os.fsdecode(bytes(tmp_path / "o") + b"\xff")], "not valid UTF-8"),
        "gguf type without gguf out": (["compress", model, "--recipe", "slim-40", "--out", tmp_path / "o",
                                        "--gguf-type", "q8_0"], "give --gguf-out FILE too"),
        "unknown kernel switch": (["eval", model, "--tasks", "wikitext2"], "SMARTPRUNE_KERNEL='garbage'"),
        "unknown verify switch": (["eval", model, "--tasks", "wikitext2"], "SMARTPRUNE_VERIFY='no'"),
        "cache under a file": (["eval", model, "--tasks", "wikitext2"], f"{tmp_path / 'afile'} is a file"),
        "offload on a CPU": (["compress", model, "--recipe", "irc", "--out", tmp_path / "o", "--offload", "--device",
                              "cpu"], "this run is on the CPU"),
    }[case]
    if case == "cache under a file":
        monkeypatch.setenv("SMARTPRUNE_CACHE", str(tmp_path / "afile" / "cache"))
    monkeypatch.setenv("SMARTPRUNE_KERNEL", "garbage" if case == "unknown kernel switch" else "1")
    monkeypatch.setenv("SMARTPRUNE_VERIFY", "no" if case == "unknown verify switch" else "1")
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in _one_clean_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"hidden_size": -32}, "hidden_size is -32"),
    ({"intermediate_size": -1}, "intermediate_size is -1"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers is '2'"),
    ({"hidden_size": 2**20 + 1}, "not a multiple of num_attention_heads"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps is nan; a config holds finite numbers"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, "rope_scaling.factor is inf"),
])
def test_a_config_with_impossible_sizes_is_one_line_before_any_weight(change, message, model_dirs, use_data,
                                                                      tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    code, _, err = run(capsys, "eval", folder, "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16")
    assert code == 2 and message in _one_clean_line(err)


@pytest.mark.parametrize("shard, message", [("../other/model.safetensors", "is not a file of the model folder"),
                                            ("gone.safetensors", "shard gone.safetensors is missing")])
def test_a_shard_index_names_files_of_its_own_folder(shard, message, model_dirs, use_data, tmp_path, capsys):
    """An index naming a shard elsewhere would load another folder's weights as this model (transformers
    follows the path); a missing shard is one line, not a model with random weights."""
    import json
    import shutil

    folder, other = tmp_path / "m", tmp_path / "other"
    shutil.copytree(model_dirs["llama"], folder)
    shutil.copytree(model_dirs["llama"], other)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    code, _, err = run(capsys, "eval", folder, "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16")
    assert code == 2 and message in _one_clean_line(err), err


@pytest.mark.parametrize("name, text, message", [
    ("twice.yaml", "export: standard\nff_neurons: {rate: 0.5}\nff_neurons: {rate: 0.9}\n",
     "'ff_neurons' is given twice (lines 2 and 3)"),
    ("twice.json", '{"export": "standard", "ff_neurons": {"rate": 0.5}, "ff_neurons": {"rate": 0.9}}',
     "'ff_neurons' is given twice"),
    ("deep.yaml", "ff_neurons: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("deep.json", '{"ff_neurons": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ("folder.yaml", None, "is a folder, not a recipe file"),
    ("merge.yaml", "base: &b {rate: 0.5}\nff_neurons:\n  <<: *b\n  rate: 0.3\n", "unknown key 'base'"),
])
def test_a_recipe_file_that_says_two_things_or_nothing_is_one_line(name, text, message, tmp_path):
    """A key given twice would silently keep the last value; deep nesting was a RecursionError."""
    from smartprune.errors import RecipeError
    from smartprune.recipes.resolve import load_recipe

    path = tmp_path / name
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)
