"""``compare --measure``: every row's running cost beside its quality, from one bench run, and the
report's frontier figure."""

from __future__ import annotations

import pytest

from smartprune.cli.main import main
from smartprune.runs.compare import CompareSettings, run_compare, write_outputs


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow  # 64 s; compare --measure stays in the default suite through the test below
def test_compare_measures_each_final_model_against_dense_in_one_run(model_dirs, use_data, tmp_path):
    narrow = tmp_path / "narrow.yaml"  # structured: fewer heads and neurons in every block
    narrow.write_text("attn_heads: {rate: 0.5}\nff_neurons: {rate: 0.5}\n")
    settings = CompareSettings(model=str(model_dirs["llama"]), methods=["dense", "wanda", str(narrow)],
                               tasks=["wikitext2"], limit=1, seqlen=32, calib_samples=4, calib_seqlen=16,
                               measure=("speed", "memory"), keep=tmp_path / "kept", measure_repeats=1,
                               measure_length=32, measure_new_tokens=8)
    result = run_compare(settings, progress=False)
    rows = {r["method"]: r for r in result.rows}
    dense, wanda, slim = rows["dense"], rows["wanda"], rows[str(narrow)]
    assert [e["resident"] for e in dense["running"]] == ["dense"]
    assert dense["running"][0]["ratios"] == pytest.approx(dict.fromkeys(dense["running"][0]["ratios"], 1.0))
    for row in (wanda, slim):  # a compressed folder: held as plain matrices and packed, both measured
        held = {e["resident"]: e for e in row["running"]}
        assert set(held) == {"dense", "compact"}
        for e in held.values():
            assert {"generate_tokens_per_s", "latency_b1_32", "throughput_seq_per_s", "resident_bytes",
                    "peak_rss_bytes", "size_bytes"} <= set(e["metrics"])
            assert e["ratios"]["resident_bytes"] == pytest.approx(
                e["metrics"]["resident_bytes"] / dense["running"][0]["metrics"]["resident_bytes"])
    wanda_held = {e["resident"]: e["metrics"]["resident_bytes"] for e in wanda["running"]}
    assert wanda_held["compact"] < wanda_held["dense"]  # packed: half the block weights and a bitmask
    slim_dense = next(e for e in slim["running"] if e["resident"] == "dense")
    assert slim_dense["ratios"]["resident_bytes"] < 1  # fewer layers, heads, neurons: smaller as plain matrices
    assert (tmp_path / "kept").is_dir() and len(list((tmp_path / "kept").iterdir())) == 2
    write_outputs(result, tmp_path / "c.json")
    md = (tmp_path / "c.md").read_text()
    assert "Running cost" in md and f"| {narrow} | recipe | compact |" in md

    from smartprune.reporting.report import write_report

    out = write_report([tmp_path / "c.json"], tmp_path / "report")
    assert (out / "figures" / "frontier0.png").stat().st_size > 0
    assert "Quality against running cost" in (out / "report.md").read_text()


def test_measure_without_keep_leaves_nothing_and_memory_alone_skips_the_timing(model_dirs, use_data, tmp_path,
                                                                              monkeypatch):
    import tempfile

    import smartprune.runs.bench as bench

    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("memory alone ran the timing rounds"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    settings = CompareSettings(model=str(model_dirs["llama"]), methods=["dense", "magnitude"], tasks=["wikitext2"],
                               limit=1, seqlen=32, calib_samples=4, calib_seqlen=16, measure=("memory",),
                               measure_length=32, measure_new_tokens=8)
    rows = run_compare(settings, progress=False).rows
    magnitude = rows[-1]
    assert {e["resident"] for e in magnitude["running"]} == {"dense", "compact"}
    assert all("peak_rss_bytes" in e["metrics"] and "generate_tokens_per_s" not in e["metrics"]
               for e in magnitude["running"])
    assert not list((tmp_path / "tmp").iterdir()) and "folder" not in magnitude  # the temporary models are gone


def test_measure_refuses_bad_input_before_any_work(model_dirs, use_data, tmp_path, capsys, monkeypatch):
    import smartprune.runs.compare as compare

    monkeypatch.setattr(compare, "compress", lambda *a, **k: pytest.fail("compressed before refusing"))
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,wanda", "--measure", "sped")
    assert code == 2 and "did you mean 'speed'" in err and err.count("\n") == 1
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,wanda", "--keep", tmp_path / "k")
    assert code == 2 and "needs --measure" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,wanda", "--measure", "memory",
                       "--keep", tmp_path / "full")
    assert code == 2 and "not empty" in err and (tmp_path / "full" / "mine.txt").read_text() == "mine"
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", "dense,wanda", "--measure", "speed",
                       "--seqlen", "32")  # the tiny model has 128 positions; decoding 128 new tokens needs 144
    assert code == 2 and "--measure" in err
