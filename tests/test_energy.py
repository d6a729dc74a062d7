"""Energy counters: read where they exist (RAPL files faked here), 'not measurable' where they do not,
never an estimate."""

import json

import pytest

import smartprune.energy as energy
from smartprune.runs.bench import BenchSettings, bench, write_outputs


def _zone(root, name: str, uj: int, max_uj: int = 10**12):
    z = root / name
    z.mkdir()
    (z / "energy_uj").write_text(f"{uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def test_rapl_packages_are_summed_and_a_wrap_is_undone(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL", tmp_path)
    a = _zone(tmp_path, "intel-rapl:0", 5_000_000, max_uj=10_000_000)
    _zone(tmp_path, "intel-rapl:1", 1_000_000, max_uj=10_000_000)
    _zone(tmp_path / "intel-rapl:0", "intel-rapl:0:0", 7)  # a sub-zone (core), already in its package
    meter = energy.energy_meter("cpu")
    assert meter.source == "rapl" and meter.read() == pytest.approx(6.0)

    def work() -> None:  # package 0 wraps from 5 J past its 10 J range to 2 J: 7 J used
        (a / "energy_uj").write_text("2000000\n")

    joules, _ = meter.measure(work)
    assert joules == pytest.approx(7.0)
    joules, seconds = meter.measure(work, idle_watts=1e6)
    assert joules == 0.0 and seconds >= 0  # idle subtracted, never below zero


def test_no_counter_is_said_not_guessed(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL", tmp_path / "absent")
    meter = energy.energy_meter("cpu")
    assert not meter.measurable and "RAPL" in meter.reason
    with pytest.raises(RuntimeError):
        meter.read()


def test_bench_energy_without_a_counter_says_not_measurable(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL", tmp_path / "absent")
    settings = BenchSettings(repeats=1, lengths=(16,), new_tokens=2, rss=False, device="cpu", energy=True)
    result = bench([str(model_dirs["llama"])], settings, progress=False)
    write_outputs(result, tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["machine"]["energy"]["measurable"] is False and data["machine"]["energy"]["reason"]
    assert "joules_per_token" not in data["models"][0]["metrics"]
    assert "not measurable here" in (tmp_path / "b.md").read_text()


def test_bench_energy_with_a_counter_gives_joules_per_token(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL", tmp_path)
    zone = _zone(tmp_path, "intel-rapl:0", 0)
    clock = {"uj": 0}

    def counters(self) -> list[float]:  # a fake package that draws exactly 10 W whenever it is read
        import time

        clock["uj"] = int(time.perf_counter() * 1e7)
        (zone / "energy_uj").write_text(str(clock["uj"]))
        return [clock["uj"] / 1e6]

    monkeypatch.setattr(energy.EnergyMeter, "counters", counters)
    settings = BenchSettings(repeats=1, lengths=(16,), batches=(2,), new_tokens=2, rss=False, device="cpu",
                             energy=True)
    result = bench([str(model_dirs["llama"])], settings, progress=False)
    e = result.machine["energy"]
    assert e["measurable"] and e["idle_watts"] == pytest.approx(10.0, rel=0.05)
    # all the draw is idle draw here, so the work's own energy is (about) nothing
    assert result.models[0]["metrics"]["joules_per_token"] == pytest.approx(0.0, abs=1e-3)
