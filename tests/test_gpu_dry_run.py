"""benchmarks/gpu.py --dry-run: the GPU run's steps on this CPU with a tiny model, so the script that
waits for a GPU cannot rot in between."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(use_data, tmp_path, monkeypatch, steps: str | None = None) -> dict:
    """benchmarks/gpu.py --dry-run (`steps`, or every step in the default order) into `tmp_path`: its report,
    after checking that every step it ran is ok."""
    if not (use_data / "gpt2-tokenizer").is_dir():
        pytest.skip("GPT-2 tokenizer not in the data folder")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("gpu", None)
    import gpu

    code = gpu.main(["--out", str(tmp_path), "--dry-run", *(["--steps", steps] if steps else [])])
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert code == 0, {k: v["result"] for k, v in data["steps"].items() if v["status"] != "ok"}
    return data


@pytest.mark.slow  # 64 s: run before firing benchmarks/gpu.py on a lent GPU (docs/gpu.md)
def test_gpu_script_dry_run_runs_every_step(use_data, tmp_path, monkeypatch):
    data = _dry_run(use_data, tmp_path, monkeypatch)  # every step, in the default order
    steps = data["steps"]
    assert list(steps) == ["a_tests", "b_compress", "d_table8_bf16", "c_recover", "e_table8_fp32"]
    assert "collected" in steps["a_tests"]["result"]["summary"]
    assert set(steps["b_compress"]["result"]) == {"sparsegpt-50", "smart-50", "paper"}
    recovered = steps["c_recover"]["result"]
    assert {"smart", "sparsegpt-match", "dense"} <= set(recovered)
    assert set(recovered["smart"]["after"]) == {"wikitext2", "ptb"}
    for step, dtype in (("d_table8_bf16", "bfloat16"), ("e_table8_fp32", "float32")):
        table = steps[step]["result"]
        assert len(table["models"]) == 4 and "energy" in table["machine"]  # measured, or why not
        assert {m["compute_dtype"] for m in table["models"]} == {dtype}
    assert (tmp_path / "gpu.md").is_file()


@pytest.mark.slow  # 33 s: the two compare steps (o: OWL at 50%, s: the bounded-spread and joint allocations)
def test_gpu_script_dry_run_runs_the_compare_steps(use_data, tmp_path, monkeypatch):
    data = _dry_run(use_data, tmp_path, monkeypatch, "os")
    owl = data["steps"]["o_owl50"]["result"]
    assert {"dense", "owl-sparsegpt", "owl-wanda"} <= {k.split(" ")[0] for k in owl}
    assert all("wikitext2 recovered" in v for k, v in owl.items() if not k.startswith("dense "))
    spread = data["steps"]["s_spread"]["result"]
    assert sum(k.startswith("sparsegpt match:") for k in spread) == 2 and len(spread) == 6
    rows = json.loads((tmp_path / "spread.json").read_text())["rows"]
    assert all(r["allocation"]["spread"] == 0.1 for r in rows if "allocation" in r)
    assert sum(r["allocation"]["sensitivity"] == "joint (sparsegpt)" for r in rows if "allocation" in r) == 2
    assert json.loads((tmp_path / "owl50.json").read_text())["settings"]["compute_dtype"] == "float32"


@pytest.mark.slow  # about 3 minutes alone: the scale issue's GPU steps (g: structured recovery, l: Table 8 at scale)
def test_gpu_script_dry_run_runs_the_scale_steps(use_data, tmp_path, monkeypatch):
    data = _dry_run(use_data, tmp_path, monkeypatch, "lg")
    recovered = data["steps"]["g_recover_structured"]["result"]
    assert set(recovered) == {"slim-40", "smart-40", "paper"}
    assert all(set(r["after"]) == {"wikitext2", "ptb"} and r["recovery"]["steps"] == 2 for r in recovered.values())
    tables = data["steps"]["l_table8_scale"]["result"]
    assert set(tables) == {"llama-tiny bfloat16", "llama-tiny float32", "llama-tiny bfloat16 compiled decode"}
    assert len(tables["llama-tiny float32"]["models"]) == 3  # dense, the structured 40% shape, 2:4
    slim = json.loads((tmp_path / "llama-tiny-structured-40" / "config.json").read_text())
    assert (slim["num_hidden_layers"], slim["intermediate_size"]) == (3, 128)  # 23/30 of 4 blocks, 806/1536 of 256
    assert {m["decode"] for m in tables["llama-tiny bfloat16 compiled decode"]["models"]} == {"compiled"}
