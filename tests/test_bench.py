"""bench: every metric for every model and compute dtype, ratios to the dense model of the same dtype,
batch sizes of the paper's Table 8, and on a GPU its peak memory."""

import json

import pytest
import torch

from smartprune.errors import DataError
from smartprune.runs.bench import BenchSettings, bench, metric_units, write_outputs


def test_metric_names_follow_lengths_and_batches():
    units = metric_units((16, 32), (8, 32))
    assert {"latency_b1_16", "latency_b1_32", "latency_b8_16", "latency_b32_16", "throughput_seq_per_s",
            "throughput_b32_seq_per_s", "generate_tokens_per_s", "finetune_seq_per_s"} == set(units)


def test_bench_every_model_in_every_compute_dtype(model_dirs, device, tmp_path):
    settings = BenchSettings(repeats=1, lengths=(16,), new_tokens=4, rss=False, batches=(2, 4), device=device,
                             compute_dtypes=("float32", "bfloat16"))
    result = bench([str(model_dirs["llama"]), str(model_dirs["gpt2"])], settings, progress=False)
    assert [(m["name"] == str(model_dirs["llama"]), m["compute_dtype"]) for m in result.models] == [
        (True, "float32"), (False, "float32"), (True, "bfloat16"), (False, "bfloat16")]
    for m in result.models:
        assert set(metric_units((16,), (2, 4))) <= set(m["metrics"]) and m["device"].startswith(device)
        assert m["metrics"]["throughput_b4_seq_per_s"] == pytest.approx(4 / m["metrics"]["latency_b4_16"])
        if m["baseline"]:  # each dtype is compared with the dense model in that dtype
            assert all(r == pytest.approx(1.0) for r in m["ratios"].values())
        if device == "cuda":  # the weights (at least a byte per stored number) plus the activations
            assert m["metrics"]["peak_gpu_bytes"] > m["parameters_in_memory"]
        else:
            assert "peak_gpu_bytes" not in m["metrics"]
    assert "[bfloat16]" in result.summary()
    write_outputs(result, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["device"].startswith(device)
    assert "same compute dtype" in (tmp_path / "b.md").read_text()


def test_bad_bench_settings_are_refused(model_dirs):
    from smartprune.errors import DataError, DeviceError

    with pytest.raises(DataError):
        BenchSettings(batches=())
    with pytest.raises(DeviceError, match="unknown compute dtype"):
        bench([str(model_dirs["llama"])], BenchSettings(rss=False, compute_dtypes=("float8",)), progress=False)
    if not torch.cuda.is_available():  # refused before any model loads
        with pytest.raises(DeviceError, match="semi-structured"):
            bench(["no/such/model"], BenchSettings(rss=False, device="cpu", semi_structured=True), progress=False)


@pytest.mark.slow  # 53 s: the default suite stays under 15 minutes; the residencies are also timed by test_cost
def test_compressed_folders_are_measured_per_residency_with_load_time_and_rss(calib, tmp_path):
    from smartprune.compression.engine import compress
    from smartprune.recipes import load_recipe
    from smartprune.storage.save import save

    from .conftest import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    model = tiny_model("llama")
    compress(model, None, load_recipe("paper"), calib=calib, progress=False)
    save(model, tmp_path / "paper")
    settings = BenchSettings(repeats=1, lengths=(16,), new_tokens=4, batches=(2,), device="cpu")
    result = bench([str(tmp_path / "dense"), str(tmp_path / "paper")], settings, progress=False)
    by_name = {m["name"]: m for m in result.models}
    paper = tmp_path / "paper"
    assert list(by_name) == [str(tmp_path / "dense"), f"{paper} [compact]", f"{paper} [dense]"]
    compact, dense = by_name[f"{paper} [compact]"], by_name[f"{paper} [dense]"]
    assert "finetune_seq_per_s" not in compact["metrics"] and "finetune_seq_per_s" in dense["metrics"]
    assert compact["metrics"]["resident_bytes"] < dense["metrics"]["resident_bytes"]
    for m in result.models:  # a fresh process per model and residency
        assert m["metrics"]["peak_rss_bytes"] > 10_000_000 and 0 < m["metrics"]["load_seconds"] < 60
    assert "| n/a |" in result.summary() and "loading time (s)" in result.summary()
    with pytest.raises(DataError, match="unknown residency 'tiny'"):
        BenchSettings(residencies=("tiny",))


def test_an_unknown_decoding_is_one_line():
    with pytest.raises(DataError, match="unknown decoding 'jit'"):
        BenchSettings(decode="jit")


@pytest.mark.slow
def test_compiled_decoding_generates_the_eager_tokens():
    """The static cache compiled by torch.compile (`bench --decode compiled`) decodes the same greedy
    tokens as the eager dynamic cache (about a minute: the compilation)."""
    from smartprune.runs.bench import _decoding
    from smartprune.testing import family_model

    model = family_model("llama", vocab=100)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False,
          "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, **kw, **_decoding("compiled")))
