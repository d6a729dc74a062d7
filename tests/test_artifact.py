"""Saving, loading and materializing compressed models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from smartprune.compression.engine import compress
from smartprune.errors import ArtifactError, OutputError
from smartprune.recipes import load_recipe
from smartprune.storage.load import load
from smartprune.storage.save import save, write_dense

from .conftest import tiny_model


@pytest.fixture
def compressed(kind, calib):
    model = tiny_model(kind)
    compress(model, None, load_recipe("paper-30"), calib=calib, progress=False)
    return model


def test_round_trip_gives_equal_logits_and_structures(compressed, calib, tmp_path):
    save(compressed, tmp_path / "out", report={"x": 1})
    loaded = load(tmp_path / "out", structured=False)
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
    with pytest.raises(ArtifactError, match="does not match the checksum"):
        load(tmp_path / "a")
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load(tmp_path / "a", verify=False)
    tensors.write_bytes(blob)
    name = next(iter(data["modules"]))
    data["modules"][name + "_missing"] = data["modules"][name]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"names module .*_missing"):
        load(tmp_path / "a")
    data["modules"].pop(name + "_missing")
    data["modules"][name] = {**data["modules"][name], "kind": "projection", "d_in": 2, "d_out": 2, "bias": False}
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="shape"):
        load(tmp_path / "a")


def test_a_flipped_byte_in_the_stored_values_is_refused(compressed, tmp_path):
    save(compressed, tmp_path / "a")
    tensors = tmp_path / "a" / "model.safetensors"
    blob = bytearray(tensors.read_bytes())
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    key = next(k for k in header if k.endswith(".weight.values"))
    blob[8 + size + header[key]["data_offsets"][0] + 2] ^= 0x01  # one bit of one stored value
    tensors.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="does not match the checksum"):
        load(tmp_path / "a")
    assert isinstance(load(tmp_path / "a", verify=False), torch.nn.Module)  # read anyway when asked


@pytest.mark.parametrize("sha", [None, "", "abc", {"other.file": "0" * 64}, 42])
def test_a_manifest_without_a_valid_checksum_is_refused_unless_asked(sha, compressed, tmp_path, monkeypatch):
    """Dropping or mangling the checksum entry must not switch the check off: a damaged weights file would
    then load and score nan."""
    save(compressed, tmp_path / "a")
    manifest = tmp_path / "a" / "smartprune.json"
    data = json.loads(manifest.read_text())
    if sha is None:
        data.pop("sha256")
    else:
        data["sha256"] = sha if isinstance(sha, dict) else {"model.safetensors": sha}
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="records no valid SHA-256"):
        load(tmp_path / "a")
    assert isinstance(load(tmp_path / "a", verify=False), torch.nn.Module)
    monkeypatch.setenv("SMARTPRUNE_VERIFY", "0")  # what the CLI's --no-verify sets
    assert isinstance(load(tmp_path / "a"), torch.nn.Module)


def test_the_cli_refuses_an_unverifiable_folder_in_one_line_and_reads_it_with_no_verify(model_dirs, tmp_path,
                                                                                        use_data, capsys, monkeypatch):
    from smartprune.cli.main import main

    monkeypatch.delenv("SMARTPRUNE_VERIFY", raising=False)
    assert main(["-q", "compress", str(model_dirs["llama"]), "--recipe", "irc", "--out", str(tmp_path / "a"),
                 "--calib-samples", "4", "--calib-seqlen", "16"]) == 0
    manifest = tmp_path / "a" / "smartprune.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in data.items() if k != "sha256"}))
    argv = ["-q", "eval", str(tmp_path / "a"), "--tasks", "wikitext2", "--limit", "1", "--seqlen", "16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-verify" in err
    assert main(["--no-verify", *argv]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda m: [m], "holds a JSON list, expected an object"),
    (lambda m: {k: v for k, v in m.items() if k != "modules"}, "'modules' is missing"),
    (lambda m: _first_masked(m).update(shape="32x32") or m, "is not a list of one or two positive"),
    (lambda m: _first_masked(m).update(shape=[0, 3]) or m, "is not a list of one or two positive"),
    (lambda m: _first_masked(m).update(encoding="rle") or m, "unknown encoding 'rle'"),
    (lambda m: _first_masked(m).update(kind="magic") or m, "has no known kind"),
    (lambda m: {**m, "aliases": ["a"]}, "'aliases' is not an object"),
])
def test_a_damaged_manifest_is_one_clear_error(damage, message, compressed, tmp_path):
    save(compressed, tmp_path / "a")
    manifest = tmp_path / "a" / "smartprune.json"
    manifest.write_text(json.dumps(damage(json.loads(manifest.read_text()))))
    with pytest.raises(ArtifactError, match=message):
        load(tmp_path / "a")


def _first_masked(manifest: dict) -> dict:
    return next(r for r in manifest["modules"].values() if "shape" in r)


def test_folded_rows_outside_the_matrix_are_refused(compressed, tmp_path):
    from safetensors.torch import load_file, save_file

    save(compressed, tmp_path / "a")
    file = tmp_path / "a" / "model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith(".folded_rows"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] = 10_000
    save_file(tensors, str(file), metadata={"format": "smartprune"})
    with pytest.raises(ArtifactError, match="positions outside"):
        load(tmp_path / "a", verify=False)  # the checksum would refuse it first


def test_the_same_model_is_stored_byte_identically(kind, calib, tmp_path):
    blobs = set()
    for i in range(4):  # safetensors wrote metadata keys in hash order: two saves differed about half the time
        model = tiny_model(kind)
        compress(model, None, load_recipe("paper-30"), calib=calib, seed=0, progress=False)
        save(model, tmp_path / str(i))
        blobs.add((tmp_path / str(i) / "model.safetensors").read_bytes())
        assert json.loads((tmp_path / str(i) / "smartprune.json").read_text())["sha256"]["model.safetensors"]
    assert len(blobs) == 1


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_permissions_of_the_umask(mask, file_mode, dir_mode, compressed, tmp_path):
    import os

    previous = os.umask(mask)
    try:
        save(compressed, tmp_path / "a", report={"x": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "a").stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert modes and set(modes.values()) == {file_mode}, modes


def test_output_folder_that_holds_something_is_refused(compressed, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        save(compressed, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save(compressed, out, overwrite=True)
    assert (out / "smartprune.json").is_file() and not (out / "keep.txt").exists()


def _rounded(model, dtype):
    """`model` with every floating tensor rounded to `dtype` and back (what a save in `dtype` keeps)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in out.state_dict().values():  # what is saved (not e.g. RoPE's recomputed inv_freq)
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return out


@pytest.mark.parametrize("recipe", ["paper", "paper-structured"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_structure_and_dtype_round_trips(recipe, dtype, kind, calib, tmp_path):
    from smartprune.storage.format import DTYPES

    model = tiny_model(kind)
    compress(model, None, load_recipe(recipe), calib=calib, progress=False)
    save(model, tmp_path / "m", dtype=dtype)
    loaded = load(tmp_path / "m", structured=False)
    fast = load(tmp_path / "m")  # with the structured inference modules
    reference = _rounded(model, DTYPES[dtype])
    with torch.no_grad():
        ref = reference(calib.ids).logits
        assert (loaded(calib.ids).logits - ref).abs().max() <= 1e-5
        assert (fast(calib.ids).logits - ref).abs().max() <= 1e-4 * ref.abs().max()
    kinds = {r["kind"] for r in json.loads((tmp_path / "m" / "smartprune.json").read_text())["modules"].values()}
    assert kinds >= {"folded", "projection", "masked"}


def test_csr_is_chosen_only_when_smaller_and_round_trips(tmp_path):
    from smartprune.modules.masked import Projection
    from smartprune.storage.format import sparse_encoding

    # 100 x 100 fp32: bitmask = 4a + 1250 bytes, CSR (int16 indices) = 6a + 404: CSR wins below a = 423
    assert sparse_encoding((100, 100), 422, 4) == "csr"
    assert sparse_encoding((100, 100), 424, 4) == "bitmask"
    from smartprune.adapters import get_adapter

    model = tiny_model("llama")
    adapter = get_adapter(model)
    adapter.prepare()
    proj: Projection = next(iter(adapter.ff_projections(0).values()))
    proj.set_mask(torch.rand(proj.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.99)
    save(model, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "smartprune.json").read_text())
    name = next(n for n, m in model.named_modules() if m is proj)
    assert manifest["modules"][name]["encoding"] == "csr"
    loaded = load(tmp_path / "s", structured=False)
    assert torch.equal(loaded.get_submodule(name).mask, proj.mask)
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_mismatched_values_and_unknown_dtype_are_refused(compressed, tmp_path):
    from safetensors.torch import load_file, save_file

    save(compressed, tmp_path / "v")
    tensors = load_file(str(tmp_path / "v" / "model.safetensors"))
    key = next(k for k in tensors if k.endswith(".weight.values"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(tmp_path / "v" / "model.safetensors"))
    with pytest.raises(ArtifactError, match="values"):
        load(tmp_path / "v")
    with pytest.raises(OutputError, match="did you mean 'float16'"):
        save(compressed, tmp_path / "w", dtype="float61")


def test_version_1_folders_still_load(compressed, calib, tmp_path):
    """Version 1 wrote no projection records, float32 and bitmasks only; it is read unchanged."""
    save(compressed, tmp_path / "v1")
    manifest = tmp_path / "v1" / "smartprune.json"
    data = json.loads(manifest.read_text())
    data["version"] = 1
    data["modules"] = {n: {k: v for k, v in r.items() if k != "bias"} | ({"kind": "masked"} if r["kind"] == "projection"
                                                                          else {})
                       for n, r in data["modules"].items() if r["kind"] != "projection" or "shape" in r}
    manifest.write_text(json.dumps(data))
    loaded = load(tmp_path / "v1", structured=False)
    with torch.no_grad():
        assert torch.allclose(loaded(calib.ids).logits, compressed(calib.ids).logits, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("edit", ["integers", "float64", "int8-not-listed"])
def test_values_in_another_type_than_the_manifest_declares_are_refused(edit, dtype, compressed, tmp_path):
    """A weight file edited to hold integers (or doubles) where the manifest says float32 values was cast
    on load; now it is refused, with the checksum re-computed so only the types differ."""
    from safetensors.torch import load_file, save_file

    from smartprune.files import sha256

    save(compressed, tmp_path / "a", dtype=dtype)
    path, manifest = tmp_path / "a" / "model.safetensors", tmp_path / "a" / "smartprune.json"
    tensors = load_file(str(path))
    assert isinstance(load(tmp_path / "a"), torch.nn.Module)  # as written it loads
    data = json.loads(manifest.read_text())
    floating = sorted((not k.endswith(".weight.values"), k) for k, t in tensors.items() if t.is_floating_point())
    key = floating[0][1]  # stored values of a masked matrix where there are any (all 8-bit in int8)
    changed = {"integers": torch.int64, "float64": torch.float64, "int8-not-listed": torch.int8}[edit]
    tensors[key] = tensors[key].round().clamp(-128, 127).to(changed) if edit != "float64" else tensors[key].double()
    save_file(tensors, str(path), metadata={"format": "pt"})
    data["sha256"] = {"model.safetensors": sha256(path)}
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"tensor '{key}' is .*declares {dtype} values"):
        load(tmp_path / "a")
