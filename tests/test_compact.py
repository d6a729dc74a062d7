"""Compact residency (packed matrices unpacked per product) and 8-bit stored values."""

import json

import numpy as np
import pytest
import torch

from smartprune.compression.engine import compress
from smartprune.errors import ArtifactError
from smartprune.modules import packed as compact
from smartprune.modules.packed import PackedEmbedding, PackedLinear, PackedMatrix, PackedProjection, Quant, quantize
from smartprune.recipes import load_recipe
from smartprune.storage.load import load, parameters_on_meta
from smartprune.storage.save import save

from .conftest import tiny_model

# A 3 x 5 matrix by hand: rows are not byte-aligned in the packed mask (5 bits per row).
W = torch.tensor([[0.0, 2.0, 0.0, 0.0, -1.0],
                  [3.0, 0.0, 0.0, 4.0, 0.0],
                  [0.0, 0.0, 5.0, 0.0, 6.0]])
VALUES = torch.tensor([2.0, -1.0, 3.0, 4.0, 5.0, 6.0])  # row-major survivors


def _bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


@pytest.mark.parametrize("encoding", ["bitmask", "csr"])
def test_packed_matrix_unpacks_rows_and_lookups_by_hand(encoding):
    if encoding == "bitmask":
        packed = PackedMatrix((3, 5), VALUES, bits=_bits(W != 0))
    else:
        packed = PackedMatrix((3, 5), VALUES, indptr=torch.tensor([0, 2, 4, 6], dtype=torch.int32),
                              indices=torch.tensor([1, 4, 0, 3, 2, 4], dtype=torch.int16))
    assert packed.row_ptr.tolist() == [0, 2, 4, 6]
    assert torch.equal(packed.dense(torch.float32), W)
    assert torch.equal(packed.rows(1, 3, torch.float32), W[1:])
    ids = torch.tensor([[2, 0], [0, 1]])
    assert torch.equal(packed.gather_rows(ids, torch.float32), W[ids])
    assert packed.dense(torch.bfloat16).dtype == torch.bfloat16


def test_eight_bit_values_by_hand():
    w = torch.tensor([[1.0, -4.0], [0.5, 0.25]])
    q, scale = quantize(w, axis=0)  # one scale per row: max |w| / 127
    assert torch.allclose(scale, torch.tensor([4 / 127, 0.5 / 127]))
    assert q.tolist() == [[32, -127], [127, 64]]  # 31.75 -> 32; 63.5 -> 64 (half to even)
    q1, scale1 = quantize(w, axis=1)  # one per column
    assert torch.allclose(scale1, torch.tensor([1 / 127, 4 / 127])) and q1.tolist() == [[127, -127], [64, 8]]
    zero_q, zero_scale = quantize(torch.zeros(2, 2), axis=0)
    assert zero_scale.tolist() == [1.0, 1.0] and not zero_q.any()
    mask = torch.tensor([[True, False], [True, True]])
    for axis, (qa, sa) in ((0, (q, scale)), (1, (q1, scale1))):
        packed = PackedMatrix((2, 2), qa[mask], bits=_bits(mask), scale=sa, quant=Quant(axis))
        expected = qa.float() * (sa[:, None] if axis == 0 else sa[None, :]) * mask
        assert torch.allclose(packed.dense(torch.float32), expected)
        assert torch.allclose(packed.gather_rows(torch.tensor([1, 0]), torch.float32), expected[[1, 0]])


def test_packed_modules_equal_their_dense_products(monkeypatch):
    monkeypatch.setattr(compact, "HEAD_SLAB_ROWS", 2)  # a head of 3 rows in slabs of 2 (the last one short)
    packed = PackedMatrix((3, 5), VALUES, bits=_bits(W != 0))
    x = torch.randn(2, 4, 3)
    bias = torch.randn(5)
    assert torch.allclose(PackedProjection(packed, bias)(x), x @ W + bias, atol=1e-6)
    h = torch.randn(2, 4, 5)
    assert torch.allclose(PackedLinear(packed)(h), h @ W.t(), atol=1e-6)
    ids = torch.tensor([[2, 1, 2]])
    assert torch.equal(PackedEmbedding(packed)(ids), W[ids])


def test_parameters_on_meta_take_no_memory_and_keep_ties():
    from transformers import AutoModelForCausalLM

    from .conftest import tiny_config

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(b.is_meta for b in model.buffers())  # RoPE's frequencies are computed for real


@pytest.fixture
def paper_folder(kind, calib, tmp_path):
    model = tiny_model(kind)
    compress(model, None, load_recipe("paper"), calib=calib, progress=False)
    save(model, tmp_path / "paper")
    return tmp_path / "paper"


def test_compact_residency_equals_dense_and_keeps_the_file_size(paper_folder, calib, monkeypatch):
    monkeypatch.setattr(compact, "HEAD_SLAB_ROWS", 24)  # the tied head in slabs (vocabulary 100)
    small, big = load(paper_folder), load(paper_folder, resident="dense")
    packed = [m for m in small.modules() if isinstance(m, PackedProjection)]
    assert packed and not any(isinstance(m, PackedProjection) for m in big.modules())
    emb = small.get_input_embeddings()
    assert isinstance(emb, PackedEmbedding)
    if small.config.tie_word_embeddings:
        assert small.get_output_embeddings().packed is emb.packed  # one table for both
    with torch.no_grad():
        assert torch.allclose(small(calib.ids).logits, big(calib.ids).logits, atol=1e-5)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(small.generate(calib.ids[:1, :4], **kw), big.generate(calib.ids[:1, :4], **kw))
    held = compact.resident_bytes(small)
    assert held < 0.6 * compact.resident_bytes(big)
    assert held < 1.2 * (paper_folder / "model.safetensors").stat().st_size


def test_sixteen_bit_files_stay_sixteen_bit_in_memory(kind, calib, tmp_path):
    model = tiny_model(kind)
    compress(model, None, load_recipe("paper"), calib=calib, progress=False)
    save(model, tmp_path / "bf16", dtype="bfloat16")
    small, big = load(tmp_path / "bf16"), load(tmp_path / "bf16", resident="dense")
    dtypes = {m.packed.values.dtype for m in small.modules() if isinstance(m, PackedProjection)}
    assert dtypes == {torch.bfloat16}
    with torch.no_grad():
        assert torch.allclose(small(calib.ids).logits, big(calib.ids).logits, atol=1e-4)


def test_int8_files_round_trip_close_to_float32(kind, calib, tmp_path):
    model = tiny_model(kind)
    compress(model, None, load_recipe("paper"), calib=calib, progress=False)
    save(model, tmp_path / "f32")
    save(model, tmp_path / "i8", dtype="int8")
    manifest = json.loads((tmp_path / "i8" / "smartprune.json").read_text())
    assert manifest["version"] == 3 and manifest["quantized"]  # W_O and the like: whole matrices in 8 bits
    assert any(rec.get("quant") for rec in manifest["modules"].values())
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("f32", "i8")}
    assert size["i8"] < 0.6 * size["f32"]  # a tiny model: norms, biases and the header weigh more
    ref = load(tmp_path / "f32", resident="dense")
    dense8, small8 = load(tmp_path / "i8", resident="dense"), load(tmp_path / "i8")
    assert any(m.packed.values.dtype == torch.int8 for m in small8.modules() if isinstance(m, PackedProjection))
    with torch.no_grad():
        want, got, got_small = ref(calib.ids).logits, dense8(calib.ids).logits, small8(calib.ids).logits
    assert torch.allclose(got_small, got, atol=1e-4)  # same dequantization, two residencies
    assert 0 < (got - want).norm() / want.norm() < 0.05  # 8 bits: close, not equal
    retrain = load(tmp_path / "i8", structured=False)  # editable modules, dequantized, masks kept
    assert any(getattr(m, "mask", None) is not None for m in retrain.modules())


def test_a_model_never_compressed_saves_and_loads_in_every_dtype(kind, calib, tmp_path):
    """The dense model re-encoded (e.g. in int8, the reference for 8-bit rows): plain nn.Linear layers are
    stored in the layout `load` rebuilds, and its 8-bit matrices decode through the kernel's dense path."""
    model = tiny_model(kind).eval()
    with torch.no_grad():
        want = model(calib.ids).logits
    for dtype in ("float32", "int8"):
        save(model, tmp_path / dtype, dtype=dtype)
        for resident in ("dense", "compact"):
            with torch.no_grad():
                got = load(tmp_path / dtype, resident=resident)(calib.ids).logits
            if dtype == "float32":
                assert torch.allclose(got, want, atol=1e-5)
            else:
                assert 0 < (got - want).norm() / want.norm() < 0.05


def test_bad_residency_requests_are_one_line(paper_folder):
    with pytest.raises(ArtifactError, match="unknown residency 'tiny'"):
        load(paper_folder, resident="tiny")
    with pytest.raises(ArtifactError, match="needs resident='dense'"):
        load(paper_folder, structured=False, resident="compact")


def test_damaged_eight_bit_scales_are_refused(kind, calib, tmp_path):
    model = tiny_model(kind)
    compress(model, None, load_recipe("paper"), calib=calib, progress=False)
    save(model, tmp_path / "i8", dtype="int8")
    manifest = tmp_path / "i8" / "smartprune.json"
    data = json.loads(manifest.read_text())
    name = next(n for n, r in data["modules"].items() if r.get("quant"))
    data["modules"][name]["quant"] = {"bits": 4, "axis": 0}
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="is not 8 bits along axis 0 or 1"):
        load(tmp_path / "i8", verify=False)
