"""Saving, loading and materializing compressed models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from smartprune.artifact import load, save, write_dense
from smartprune.engine import compress
from smartprune.errors import ArtifactError, OutputError
from smartprune.recipes import load_recipe

from .conftest import tiny_model


@pytest.fixture
def compressed(kind, calib):
    model = tiny_model(kind)
    compress(model, None, load_recipe("paper-30"), calib=calib, progress=False)
    return model


def test_round_trip_gives_equal_logits_and_structures(compressed, calib, tmp_path):
    save(compressed, tmp_path / "out", report={"x": 1})
    loaded = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(loaded(calib.ids).logits, compressed(calib.ids).logits, atol=1e-5)
    masks = {n: m.mask for n, m in compressed.named_modules() if getattr(m, "mask", None) is not None}
    loaded_masks = {n: m.mask for n, m in loaded.named_modules() if getattr(m, "mask", None) is not None}
    assert masks.keys() == loaded_masks.keys()
    assert all(torch.equal(masks[n], loaded_masks[n]) for n in masks)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == {"x": 1}


def test_dense_folder_loads_in_vanilla_transformers_with_equal_logits(compressed, calib, tmp_path):
    write_dense(compressed, tmp_path / "dense")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not any("smartprune" in type(m).__module__ for m in vanilla.modules())
    with torch.no_grad():
        assert torch.allclose(vanilla(calib.ids).logits, compressed(calib.ids).logits, atol=1e-5)


def test_compact_file_is_smaller_than_dense(compressed, tmp_path):
    save(compressed, tmp_path / "c")
    write_dense(compressed, tmp_path / "d")
    assert (tmp_path / "c" / "model.safetensors").stat().st_size < (tmp_path / "d" / "model.safetensors").stat().st_size


def test_bad_artifacts_are_refused_with_one_clear_error(compressed, tmp_path):
    save(compressed, tmp_path / "a")
    manifest = tmp_path / "a" / "smartprune.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        load(tmp_path / "a")
    manifest.write_text(json.dumps(data))
    tensors = tmp_path / "a" / "model.safetensors"
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load(tmp_path / "a")
    tensors.write_bytes(blob)
    name = next(iter(data["modules"]))
    data["modules"][name + "_missing"] = data["modules"][name]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="lacks tensor"):
        load(tmp_path / "a")


def test_output_folder_that_holds_something_is_refused(compressed, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        save(compressed, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save(compressed, out, overwrite=True)
    assert (out / "smartprune.json").is_file() and not (out / "keep.txt").exists()
