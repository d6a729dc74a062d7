"""The command line, end to end on tiny models, and every bad input of the engine issue."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import smartprune
from smartprune.cli.main import main


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compress_writes_a_loadable_model_report_and_dense_twin(arch, model_dirs, use_data, tmp_path, capsys):
    out, dense = tmp_path / "out", tmp_path / "dense"
    code, stdout, err = run(capsys, "compress", model_dirs[arch], "--recipe", "paper", "--out", out,
                            "--dense-out", dense, "--calib-samples", "8", "--calib-seqlen", "32")
    assert code == 0, err
    assert "overall" in stdout and "FPP-FF" in stdout  # the paper recipe: its method names on its groups
    report = json.loads((out / "report.json").read_text())
    assert set(report["groups"]) == {"irc", "dwc", "attn_out", "fpp_emb", "fpp_ff"}
    assert report["groups"]["irc"]["after"] < report["groups"]["irc"]["before"]
    assert 0.5 < report["overall"]["compression"] < 0.8
    o = report["overall"]  # the last lines say what the user got, and how to measure its speed
    assert f"({o['params_after'] / o['params_before']:.2f}x dense)" in stdout
    assert stdout.rstrip().splitlines()[-1] == f"speed against dense: smartprune bench {model_dirs[arch]} {out}"
    model = smartprune.load(out)
    assert smartprune.load_model(out).tokenizer is not None
    vanilla = AutoModelForCausalLM.from_pretrained(dense).eval()
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, vanilla(ids).logits, atol=1e-4)


def test_recipes_lists_one_line_each(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    lines = out.strip().splitlines()
    names = {line.split()[0] for line in lines}
    assert len(lines) == 13 and {"paper-structured", "smart", "smart-40", "smart-50", "slim-25", "slim-40",
                                 "slim-50"} <= names


def _one_clean_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_inputs_get_one_line_and_a_nonzero_exit(model_dirs, use_data, tmp_path, capsys):
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("irc: {rate: 1.5}\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("irc: {rate: 1.0, speed: 3}\n")
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    out = tmp_path / "never"
    m = model_dirs["gpt2"]
    cases = [
        (["compress", tmp_path / "missing-model", "--recipe", "paper", "--out", out], "model path not found"),
        (["compress", "smollm2-13m", "--recipe", "paper", "--out", out], "did you mean 'smollm2-135m'"),
        (["compress", "smartprune-tests/no-such-model", "--recipe", "paper", "--out", out], "Hugging Face hub"),
        (["compress", vision, "--recipe", "paper", "--out", out], "model type 'vit' is not a causal language model"),
        (["compress", m, "--recipe", "papr", "--out", out], "unknown recipe 'papr' (did you mean 'paper'?)"),
        (["compress", m, "--recipe", bad_recipe, "--out", out], "irc.rate: 1.5 is outside [0, 1]"),
        (["compress", m, "--recipe", unknown_key, "--out", out], "unknown key 'speed'"),
        (["compress", m, "--recipe", "paper", "--out", busy], "not empty (use --overwrite"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in _one_clean_line(err), err
        assert not out.exists()
    assert [p.name for p in busy.iterdir()] == ["x"]


def test_missing_data_directory_names_the_path_and_the_variable(model_dirs, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SMARTPRUNE_DATA", str(tmp_path / "no-data"))
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "irc", "--out", tmp_path / "o")
    line = _one_clean_line(err)
    assert code == 2 and str(tmp_path / "no-data") in line and "SMARTPRUNE_DATA" in line
    assert not (tmp_path / "o").exists()


def test_unknown_subcommand_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compres"])
    assert exit_info.value.code == 2
    assert "did you mean 'compress'" in capsys.readouterr().err


def test_eval_prints_models_side_by_side(model_dirs, use_data, tmp_path, capsys):
    code, out, err = run(capsys, "eval", model_dirs["gpt2"], model_dirs["llama"], "--seqlen", "64", "--limit", "2",
                         "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "wikitext2" in out
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["results"]["wikitext2"]["windows"] == 2 and data["results"]["wikitext2"]["perplexity"] > 1


def test_compare_runs_every_method_on_equal_terms(model_dirs, use_data, tmp_path, capsys):
    (use_data / "ptb").mkdir(exist_ok=True)
    (use_data / "ptb" / "ptb.test.txt").write_text(" the cat sat on the mat \n" * 400)
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,magnitude,wanda,sparsegpt,irc",
                         "--sparsity", "0.5,2:4,match:irc", "--limit", "1", "--seqlen", "32",
                         "--calib-samples", "8", "--calib-seqlen", "16", "--json", tmp_path / "c.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [(r["method"], r["sparsity"].split(" ")[0]) for r in rows] == [
        ("irc", "recipe"), ("dense", "0"),
        *[(m, s) for m in ("magnitude", "wanda", "sparsegpt") for s in ("0.5", "2:4", "match:irc")]]
    irc = rows[0]["compression"]
    for r in rows:
        assert set(r["perplexity"]) == {"wikitext2", "ptb"} and r["seconds"] >= 0
        if r["sparsity"].startswith("match:"):
            assert abs(r["compression"] - irc) < 1e-3  # equal size
    assert "Reported in the paper (not measured here)" in (tmp_path / "c.md").read_text()


def test_an_interrupted_compare_resumes_from_the_rows_it_kept(model_dirs, use_data, tmp_path, monkeypatch):
    import smartprune.runs.compare as cmp
    from smartprune.errors import DataError

    def settings(**kw) -> cmp.CompareSettings:
        return cmp.CompareSettings(model=str(model_dirs["llama"]), methods=["dense", "magnitude", "wanda"],
                                   sparsities=["0.5", "match:irc"], tasks=["wikitext2"], limit=1, seqlen=32,
                                   calib_samples=4, calib_seqlen=16, device="cpu", **kw)

    straight = cmp.run_compare(settings(), progress=False)
    real, compressed = cmp.compress, []

    def compress(model, tok, recipe, **kw):
        compressed.append(recipe.name)
        if recipe.name == "wanda" and fail:
            raise RuntimeError("interrupted")
        return real(model, tok, recipe, **kw)

    monkeypatch.setattr(cmp, "compress", compress)
    partial, fail = cmp.resume_file(tmp_path / "c.json"), True
    with pytest.raises(RuntimeError, match="interrupted"):
        cmp.run_compare(settings(), progress=False, partial=partial)
    kept = json.loads(partial.read_text())
    assert list(kept["units"]) == ["dense", "magnitude 0.5", "magnitude match:irc"] and "irc" in kept["removed_by"]
    with pytest.raises(DataError, match="interrupted compare with other settings"):
        cmp.run_compare(settings(seed=1), progress=False, partial=partial)
    compressed.clear()
    fail = False
    resumed = cmp.run_compare(settings(), progress=False, partial=partial)
    assert compressed == ["wanda", "wanda"]  # neither dense, magnitude nor irc (for match:irc) again
    assert [(r["method"], r["sparsity"], r["perplexity"]) for r in resumed.rows] == \
        [(r["method"], r["sparsity"], r["perplexity"]) for r in straight.rows]
    cmp.write_outputs(resumed, tmp_path / "c.json")
    assert not partial.exists() and (tmp_path / "c.json").is_file()


def test_compare_with_equal_recovery_adds_recovered_columns_and_a_dense_fine_tuned_row(model_dirs, use_data,
                                                                                      tmp_path, capsys):
    code, out, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,wanda", "--tasks", "wikitext2",
                         "--sparsity", "0.5", "--limit", "1", "--seqlen", "32", "--calib-samples", "4",
                         "--calib-seqlen", "16", "--recover-tokens", "256", "--json", tmp_path / "c.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "dense fine-tuned", "wanda"]
    assert "recovered" not in rows[0]
    for r in rows[1:]:
        assert r["recovered"]["tokens"] == 256 and r["recovered"]["structure_kept"]
        assert r["recovered"]["perplexity"]["wikitext2"] > 1
    assert "wikitext2 ppl recovered" in out


def test_compare_recovers_every_row_with_the_demos_budget_when_asked(model_dirs, use_data, tmp_path, capsys,
                                                                    monkeypatch):
    import smartprune.runs.compare as compare

    # the named budget, shrunk for a tiny model (the real one is 8 steps of 4 x 128: minutes here)
    monkeypatch.setitem(compare.RECOVERY_BUDGETS, "quick", {"steps": 3, "seqlen": 16, "batch_size": 2, "lr": 1e-3,
                                                            "eval_every": 8, "eval_windows": 1})
    code, out, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,wanda", "--tasks", "wikitext2",
                         "--limit", "1", "--seqlen", "32", "--calib-samples", "4", "--calib-seqlen", "16",
                         "--recover-budget", "quick", "--json", tmp_path / "c.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "dense fine-tuned", "wanda"]
    for r in rows[1:]:
        assert r["recovered"]["steps"] == 3 and r["recovered"]["tokens"] == 3 * 2 * 16
    assert f"same budget ({3 * 2 * 16:,} tokens" in out
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,wanda", "--recover-budget",
                       "quick", "--recover-tokens", "256")
    assert code == 2 and "give one" in _one_clean_line(err)


def test_compare_runs_owl_beside_uniform_at_equal_size(model_dirs, use_data, tmp_path, capsys):
    code, out, err = run(capsys, "compare", model_dirs["llama"], "--methods", "sparsegpt,owl-sparsegpt,owl-wanda",
                         "--tasks", "wikitext2", "--sparsity", "0.5", "--limit", "1", "--seqlen", "32",
                         "--calib-samples", "4", "--calib-seqlen", "16", "--json", tmp_path / "c.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["sparsegpt", "owl-sparsegpt", "owl-wanda"]
    assert rows[1]["compression"] == pytest.approx(rows[0]["compression"], abs=1e-3)  # equal size, other shares
    assert "| owl-sparsegpt |" in out


def test_compare_runs_compression_and_retraining_in_the_compute_dtype_asked(model_dirs, use_data, tmp_path, capsys,
                                                                          monkeypatch):
    import smartprune.runs.compare as cmp

    real_compress, real_recover, seen = cmp.compress, cmp.recover, []

    def compress(model, tok, recipe, **kw):
        seen.append(("compress", kw["compute_dtype"]))
        return real_compress(model, tok, recipe, **kw)

    def recover(model, tok, cfg, **kw):
        seen.append(("recover", cfg.compute_dtype))
        return real_recover(model, tok, cfg, **kw)

    monkeypatch.setattr(cmp, "compress", compress)
    monkeypatch.setattr(cmp, "recover", recover)
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "wanda", "--tasks", "wikitext2",
                       "--limit", "1", "--seqlen", "32", "--calib-samples", "4", "--calib-seqlen", "16",
                       "--recover-tokens", "64", "--compute-dtype", "bfloat16", "--json", tmp_path / "c.json")
    assert code == 0, err
    assert seen == [("compress", "bfloat16"), ("recover", "bfloat16")]
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["compute_dtype"] == "bfloat16"
    seen.clear()
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "wanda", "--compute-dtype", "bf16")
    assert code == 2 and "unknown compute dtype 'bf16'" in _one_clean_line(err) and not seen


def test_compare_rejects_unknown_methods_and_bad_sparsities(model_dirs, use_data, capsys):
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "wand")
    assert code == 2 and "did you mean 'wanda'" in _one_clean_line(err)
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "wanda", "--sparsity", "1.5")
    assert code == 2 and "1.5 is outside [0, 1]" in _one_clean_line(err)


def test_each_flag_name_has_one_meaning_and_old_spellings_still_work_with_a_notice(capsys):
    from smartprune.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    having = {flag: {n for n, sub in subs.items() if flag in sub._option_string_actions}
              for flag in ("--seqlen", "--train-seqlen", "--compute-dtype")}
    assert having["--train-seqlen"] == {"recover", "train"}  # training windows, under their own name
    for name in having["--seqlen"] - having["--train-seqlen"]:  # everywhere else: an evaluation window
        assert "window" in subs[name]._option_string_actions["--seqlen"].help, name
    dtype_helps = {subs[n]._option_string_actions["--compute-dtype"].help.rsplit(": ", 1)[1].removesuffix(
        " (one row per entry)") for n in having["--compute-dtype"]}
    assert len(having["--compute-dtype"]) >= 5 and len(dtype_helps) == 1  # one list of choices, said once
    args = parser.parse_args(["recover", "c", "--teacher", "none", "--out", "o", "--seqlen", "64"])
    err = capsys.readouterr().err
    assert args.seqlen == 64 and err.count("\n") == 1 and "--seqlen is now --train-seqlen" in err
    args = parser.parse_args(["classify", "m", "--task", "sst2", "--calib-examples", "8"])
    assert args.calib_samples == 8 and capsys.readouterr().err == ""
