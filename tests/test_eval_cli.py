"""`smartprune eval / generate / classify / train` end to end on tiny models and the small data folder."""

import json

import pytest

from .test_cli import _one_clean_line, run


def test_eval_runs_every_kind_of_task_side_by_side_with_deltas(model_dirs, use_data, tmp_path, capsys):
    path = tmp_path / "e.json"
    code, out, err = run(capsys, "eval", model_dirs["gpt2"], model_dirs["llama"], "--tasks",
                         "wikitext2,sst2,rte,qqp,generation", "--seqlen", "64", "--limit", "2", "--lengths", "4", "8",
                         "--json", path)
    assert code == 0, err
    data = json.loads(path.read_text())
    r = data["results"]
    assert r["wikitext2"]["windows"] == 2 and r["wikitext2"]["tokens"] == 2 * 63
    assert r["sst2"]["examples"] == 8 and 0 <= r["sst2"]["accuracy"] <= 1 and r["sst2"]["mode"] == "zero-shot"
    assert r["rte"]["examples"] == 2
    assert r["qqp"] == {"available": False, "reason": r["qqp"]["reason"], "mode": "zero-shot"}
    assert set(r["generation"]) >= {"repetition@4", "meaningless@8"}
    assert list(data["by_model"]) == [str(model_dirs["gpt2"]), str(model_dirs["llama"])]
    row = next(line for line in out.splitlines() if line.startswith("| sst2 | accuracy"))
    assert "(+" in row or "(-" in row  # the second model's delta against the first
    assert "| qqp | not available |" in out


def test_eval_finetune_mode_reports_missing_train_splits(model_dirs, use_data, tmp_path, capsys):
    path = tmp_path / "f.json"
    code, _, err = run(capsys, "eval", model_dirs["llama"], "--tasks", "sst2,rte", "--mode", "finetune",
                         "--max-train", "16", "--ft-seqlen", "16", "--json", path)
    assert code == 0, err
    r = json.loads(path.read_text())["results"]
    assert r["sst2"]["mode"] == "finetune" and r["sst2"]["training"]["steps"] == 2
    assert r["rte"]["available"] is False and "train" in r["rte"]["reason"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "wikitext"], "did you mean 'wikitext2'"),
    (["--tasks", "sst-2"], "did you mean 'sst2'"),
    (["--limit", "0"], "limit must be a positive number"),
    (["--limit", "-3"], "limit must be a positive number"),
    (["--seqlen", "4096"], "longer than the model's 128 positions"),
    (["--mode", "fine-tune"], "did you mean 'finetune'"),
    (["--examples", "0"], "examples must be a positive count"),
    (["--tasks", "wikitext103"], "wiki.test.tokens"),
])
def test_eval_bad_inputs_get_one_line(argv, message, model_dirs, use_data, capsys):
    code, _, err = run(capsys, "eval", model_dirs["gpt2"], *argv)
    line = _one_clean_line(err)
    assert code == 2 and message in line, err
    if message.endswith("wiki.test.tokens"):
        assert "SMARTPRUNE_DATA" in line


@pytest.mark.parametrize(("argv", "message"), [
    (["--prompt", "Hi"], "--prompt acts on generation tasks, and --tasks wikitext2 has none"),
    (["--sample"], "--sample acts on generation tasks"),
    (["--tasks", "sst2", "--seqlen", "64"], "--seqlen acts on perplexity tasks, and --tasks sst2 has none"),
    (["--mode", "finetune"], "--mode acts on classification tasks"),
    (["--tasks", "sst2", "--max-train", "8"], "--max-train acts on --mode finetune"),
    (["--examples", "4"], "--examples acts on classification and lm-eval tasks"),
    (["--lm-eval-allow-code"], "no folder was given"),
])
def test_eval_refuses_a_flag_that_does_nothing_for_its_tasks(argv, message, model_dirs, use_data, capsys,
                                                              monkeypatch):
    import smartprune.runs.evaluate as runs_evaluate

    monkeypatch.setattr(runs_evaluate, "load_model", lambda *a, **k: pytest.fail("a model loaded first"))
    code, _, err = run(capsys, "eval", model_dirs["gpt2"], *argv)
    assert code == 2 and message in _one_clean_line(err), err


def test_eval_of_an_empty_text_is_one_clear_error(model_dirs, use_data, capsys):
    raw = use_data / "wikitext-2-raw" / "wiki.test.raw"
    saved = raw.read_text()
    raw.write_text("\n \n")
    try:
        code, _, err = run(capsys, "eval", model_dirs["gpt2"])
    finally:
        raw.write_text(saved)
    assert code == 2 and "is empty" in _one_clean_line(err)


def test_generate_prints_texts_and_metrics(model_dirs, use_data, capsys):
    code, out, err = run(capsys, "generate", model_dirs["llama"], "--prompt", "The cat", "--lengths", "6",
                         "--sample", "--seed", "1")
    assert code == 0, err
    assert "The cat" in out and "repetition@6" in out and "sample(" in out


def test_classify_finetunes_compresses_and_rescores(model_dirs, use_data, tmp_path, capsys, device):
    path = tmp_path / "c.json"
    code, out, err = run(capsys, "classify", model_dirs["gpt2"], "--task", "sms", "--recipe", "fpp-ff",
                         "--max-train", "16", "--ft-seqlen", "16", "--calib-examples", "8", "--json", path,
                         "--device", device)
    assert code == 0, err
    data = json.loads(path.read_text())
    assert data["training"]["device"].startswith(device)
    assert data["report"]["groups"]["fpp_ff"]["after"] < data["report"]["groups"]["fpp_ff"]["before"]
    calib = data["report"]["calibration"]
    assert calib["text"] == "sms train" and calib["samples"] == 8 and calib["eval_samples"] == 4
    assert calib["seqlen"] <= 16  # examples padded to the longest, truncated at --ft-seqlen
    assert data["dense"]["examples"] == data["compressed"]["examples"] == 10
    assert "| accuracy |" in out
    code, _, err = run(capsys, "classify", model_dirs["gpt2"], "--task", "rte", "--recipe", "fpp-ff")
    assert code == 2 and "cannot be fine-tuned here" in _one_clean_line(err)


def test_train_from_scratch_saves_a_loadable_gpt2(use_data, tmp_path, capsys):
    import smartprune

    out = tmp_path / "g"
    code, _, err = run(capsys, "train", "--config", "gpt2-tiny", "--steps", "3", "--batch-size", "2",
                            "--train-seqlen", "32", "--out", out)
    assert code == 0, err
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps_done"] == 3 and summary["test"]["windows"] == 8
    loaded = smartprune.load_model(out)
    assert loaded.model.config.model_type == "gpt2" and loaded.tokenizer is not None
    code, _, err = run(capsys, "train", "--config", "gpt2-mega", "--out", tmp_path / "x")
    assert code == 2 and "did you mean" in _one_clean_line(err) and not (tmp_path / "x").exists()


def test_eval_on_a_device_in_a_compute_dtype(model_dirs, use_data, tmp_path, capsys, device):
    """Device-generic evaluation (CPU, and GPU where torch sees one), bfloat16 autocast."""
    import torch

    code, _, err = run(capsys, "eval", model_dirs["llama"], "--tasks", "wikitext2", "--seqlen", "32", "--limit", "2",
                       "--device", device, "--compute-dtype", "bfloat16", "--json", tmp_path / "e.json")
    assert code == 0, err
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["settings"]["compute_dtype"] == "bfloat16" and data["settings"]["device"].startswith(device)
    assert data["results"]["wikitext2"]["perplexity"] > 1
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "eval", model_dirs["llama"], "--device", "cuda:0")
        assert code == 2 and "no GPU" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["train", "--config", "gpt2-tiny", "--steps", "1", "--out", "OUT"],
    ["sweep", "MODEL", "--method", "irc", "--rates", "0,1", "--json", "OUT.json"],
    ["compare", "MODEL", "--methods", "dense"],
    ["demo", "--model", "MODEL", "--quick"],
    ["bench", "MODEL", "--repeats", "1", "--no-rss", "--json", "OUT.json"],
    ["classify", "MODEL", "--task", "sms", "--recipe", "fpp-ff", "--json", "OUT.json"],
])
def test_asking_for_a_gpu_without_one_is_one_line_before_any_work(argv, model_dirs, use_data, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [str(model_dirs["llama"]) if a == "MODEL" else str(tmp_path / "o") + a[3:] if a.startswith("OUT") else a
            for a in argv]
    code, _, err = run(capsys, *argv, "--device", "cuda")
    assert code == 2 and "no GPU" in _one_clean_line(err)
    assert not any(tmp_path.iterdir())


def test_eval_holds_a_compressed_folder_compact_or_dense_with_equal_results(model_dirs, use_data, tmp_path, capsys):
    c = tmp_path / "c"
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "paper", "--out", c, "--calib-samples", "4",
                       "--calib-seqlen", "16")
    assert code == 0, err
    ppl = {}
    for resident in ("compact", "dense"):
        path = tmp_path / f"{resident}.json"
        code, _, err = run(capsys, "eval", c, "--tasks", "wikitext2", "--seqlen", "32", "--limit", "2",
                           "--resident", resident, "--json", path)
        assert code == 0, err
        ppl[resident] = json.loads(path.read_text())["results"]["wikitext2"]["perplexity"]
    assert ppl["compact"] == pytest.approx(ppl["dense"], rel=1e-5)
    code, _, err = run(capsys, "eval", c, "--tasks", "sst2", "--mode", "finetune", "--resident", "compact")
    assert code == 2 and "inference only" in _one_clean_line(err)
