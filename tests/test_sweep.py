"""Sweeps: monotone rates, one evaluation per rate, variants, resume from the JSON."""

import json

import pytest

from smartprune.errors import DataError, RecipeError
from smartprune.recipes import load_recipe
from smartprune.runs.sweep import SweepSettings, parse_rates, point_recipe, run_sweep

from .test_cli import _one_clean_line, run


def test_rates_parse_and_validate():
    assert parse_rates("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_rates("0.5,0.1") == [0.1, 0.5]
    for bad in ("0:2:0.5", "a,b", "0:1:0"):
        with pytest.raises(DataError):
            parse_rates(bad)


def test_point_recipes_set_the_rate_field_and_the_variant():
    base = load_recipe("paper")
    r = point_recipe(base, "irc", "k", 0.3)
    assert list(r.stages) == ["irc"] and r.stages["irc"].rate == 0.3 and r.stages["irc"].variant == "k"
    r = point_recipe(base, "fpp-ff", "direct", 0.5)
    assert r.stages["fpp_ff"].target_sparsity == 0.5 and r.stages["fpp_ff"].steps == 0
    r = point_recipe(base, "irc+dwc", "", 0.2)
    assert r.stages["irc"].rate == r.stages["dwc"].rate == 0.2
    assert point_recipe(base, "wanda", "", 0.6).stages["wanda"].sparsity == 0.6
    with pytest.raises(RecipeError, match="did you mean 'fpp-ff'"):
        point_recipe(base, "fpp_f", "", 0.5)


def _settings(model, **kw):
    return SweepSettings(model=str(model), method="fpp-ff", rates=[0.0, 0.3, 0.6], tasks=["wikitext2"], limit=2,
                         seqlen=64, calib_samples=4, calib_seqlen=16, **kw)


def test_sweep_evaluates_each_rate_once_with_monotone_compression(model_dirs, use_data, tmp_path):
    out = run_sweep(_settings(model_dirs["llama"], variants=["ablation"]), tmp_path / "s.json", progress=False)
    points = out["points"]
    assert [(p["variant"], p["rate"]) for p in points] == [
        ("", 0.0), ("cumulative", 0.3), ("cumulative", 0.6), ("direct", 0.3), ("direct", 0.6),
        ("optimized", 0.3), ("optimized", 0.6)]
    for variant in ("direct", "optimized", "cumulative"):
        comp = [p["compression"] for p in points if p["variant"] == variant]
        assert comp == sorted(comp) and comp[0] > 0
    assert all(p["results"]["wikitext2"]["windows"] == 2 for p in points)


def test_an_interrupted_sweep_resumes_without_recomputing(model_dirs, use_data, tmp_path, monkeypatch):
    import smartprune.runs.sweep as sweep

    path = tmp_path / "r.json"
    settings = _settings(model_dirs["gpt2"])
    calls = []
    real = sweep.compress

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted during the second compression
        return real(*args, **kw)

    monkeypatch.setattr(sweep, "compress", failing)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(settings, path, progress=False)
    saved = json.loads(path.read_text())["points"]
    assert [(p["variant"], p["rate"]) for p in saved] == [("", 0.0), ("", 0.3)]
    calls.clear()
    monkeypatch.setattr(sweep, "compress", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = run_sweep(settings, path, progress=False)
    assert len(calls) == 1 and [p["rate"] for p in out["points"]] == [0.0, 0.3, 0.6]
    with pytest.raises(DataError, match="other settings"):
        run_sweep(_settings(model_dirs["gpt2"], seed=1), path, progress=False)


def test_sweep_cli_and_bad_variants(model_dirs, use_data, tmp_path, capsys):
    code, out, err = run(capsys, "sweep", model_dirs["gpt2"], "--method", "dwc", "--rates", "0.5,1",
                         "--variants", "lower,upper", "--limit", "1", "--seqlen", "32", "--calib-samples", "4",
                         "--calib-seqlen", "16", "--json", tmp_path / "d.json")
    assert code == 0, err
    assert "| lower | 0.5 |" in out and "| upper | 1 |" in out
    code, _, err = run(capsys, "sweep", model_dirs["gpt2"], "--method", "dwc", "--variants", "uper")
    assert code == 2 and "did you mean 'upper'" in _one_clean_line(err)


def test_sweep_with_equal_recovery_retrains_every_point(model_dirs, use_data, tmp_path):
    out = run_sweep(_settings(model_dirs["llama"], recover_tokens=512), tmp_path / "s.json", progress=False)
    assert [p["rate"] for p in out["points"]] == [0.0, 0.3, 0.6]
    for p in out["points"]:
        assert p["recovery"]["tokens"] == 512 and p["recovery"]["steps"] == 1  # 8 windows of 64
        assert p["results_before_recovery"]["wikitext2"]["windows"] == p["results"]["wikitext2"]["windows"] == 2
    assert out["settings_key"]["recover_tokens"] == 512
