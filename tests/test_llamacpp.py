"""Our GGUF export held against llama.cpp: its own converter's file of the same folder (every metadata
key and every tensor's bytes), and llama.cpp itself (its tokens for a text equal to the source
tokenizer's, its logits within the type's tolerance of transformers')."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from smartprune.errors import OutputError
from smartprune.runtimes import llamacpp
from smartprune.storage.gguf_writer import write_gguf
from smartprune.testing import gguf_ready_model

TEXT = ("The year 1984 was 3.14 times better, isn't it? Yes:\n\n apples & 7 pears, naïve café.\n"
        " = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor .")
# keys we write where the converter leaves llama.cpp's default: the value must be what the tokenizer does
OURS_ONLY = {"tokenizer.ggml.add_bos_token"}


@pytest.fixture(scope="session")
def llama_source() -> Path:
    """The llama.cpp source (the llama-cpp-python sdist, fetched once from PyPI like every package)."""
    try:
        return llamacpp._fetch_source() / "vendor" / "llama.cpp"
    except llamacpp.RuntimeMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def llama_built() -> Path:
    reason = llamacpp.why_not()
    if reason:
        pytest.skip(f"llama.cpp cannot be built here: {reason}")
    return llamacpp.build()  # ./run test builds it ahead (cached)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's own tokenizer, from the GGUF the built-in model ships in."""
    from transformers import AutoTokenizer

    from smartprune.storage.sources import _builtin_gguf

    path = _builtin_gguf("smollm2-135m")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _folder(tmp_path: Path, family: str, tokenizer) -> tuple[Path, object]:
    model = gguf_ready_model(family, len(tokenizer))
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def _read(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(map(int, t.shape)), np.asarray(t.data).tobytes())
               for t in reader.tensors}
    return keys, tensors


@pytest.mark.parametrize("family, tokenizer, kind", [
    ("llama", "smollm2", "q8_0"),  # SmolLM2's shape and tokenizer ("smollm", no BOS)
    ("gemma3_text", "gpt2", "f16"),  # norms as 1 + w, the local rotary base, GPT-2's split
    pytest.param("llama", "smollm2", "f32", marks=pytest.mark.slow),
    pytest.param("qwen3", "gpt2", "bf16", marks=pytest.mark.slow),
    pytest.param("llama", "gpt2", "f32", marks=pytest.mark.slow),
])
def test_export_equals_what_llama_cpp_converter_writes(family, tokenizer, kind, llama_source, tmp_path, request):
    tok = request.getfixturevalue(f"{tokenizer}_tokenizer")
    folder, model = _folder(tmp_path, family, tok)
    ours = write_gguf(model, tmp_path / "ours.gguf", tokenizer=tok, gguf_type=kind, name=folder.name)
    theirs = llamacpp.convert(folder, tmp_path / "theirs.gguf", kind, name=folder.name)
    (our_keys, our_tensors), (their_keys, their_tensors) = _read(ours), _read(theirs)
    assert {k: our_keys.get(k) for k in their_keys} == their_keys  # every key they write, with their value
    assert set(our_keys) - set(their_keys) <= OURS_ONLY
    assert our_keys["tokenizer.ggml.add_bos_token"] is False  # neither tokenizer starts a text with BOS
    assert our_keys["general.name"] == folder.name and "/" not in our_keys["general.name"]
    assert set(our_tensors) == set(their_tensors)
    for name, (qtype, shape, data) in their_tensors.items():
        assert our_tensors[name][:2] == (qtype, shape), name
        assert our_tensors[name][2] == data, f"{name}: other bytes"


@pytest.mark.parametrize("family, tokenizer, kind, tolerance", [
    ("llama", "smollm2", "f32", 2e-3),
    ("qwen3", "gpt2", "q8_0", 5e-2),
    ("gemma3_text", "gpt2", "f32", 2e-3),
    ("llama", "gpt2", "q4_0", 0.2),
])
def test_llama_cpp_reads_our_export_as_the_same_model(family, tokenizer, kind, tolerance, llama_built, tmp_path,
                                                      request):
    tok = request.getfixturevalue(f"{tokenizer}_tokenizer")
    _, model = _folder(tmp_path, family, tok)
    path = write_gguf(model, tmp_path / "m.gguf", tokenizer=tok, gguf_type=kind)
    ids, logits = llamacpp.evaluate(path, TEXT)
    want = tok(TEXT)["input_ids"]
    assert ids.tolist() == want  # same pre-tokenizer, same BOS rule
    with torch.no_grad():
        reference = model(torch.tensor([want])).logits[0].numpy()
    error = np.abs(logits - reference).max() / np.abs(reference).max()
    assert error < tolerance
    if kind != "f32":
        assert error > 1e-5  # quantized: close, not equal


def test_what_llama_cpp_would_read_differently_is_refused_in_one_line(gpt2_tokenizer, tmp_path):
    from tokenizers import normalizers

    with pytest.raises(OutputError, match="llama-quantize"):
        write_gguf(gguf_ready_model("llama", 64), tmp_path / "a.gguf", gguf_type="q4_k")
    odd = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path)
    odd.backend_tokenizer.normalizer = normalizers.NFKC()  # a normalizer llama.cpp's gpt-2 split does not run
    with pytest.raises(OutputError, match="pre-tokenizer") as caught:
        write_gguf(gguf_ready_model("llama", len(odd)), tmp_path / "b.gguf", tokenizer=odd)
    assert "\n" not in str(caught.value)
    model = gguf_ready_model("gemma3_text", 64)
    model.config.head_dim = 128  # llama.cpp scales Gemma 3's queries by the head size, transformers by 256
    with pytest.raises(OutputError, match="head"):
        write_gguf(model, tmp_path / "c.gguf")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_bench_times_a_gguf_file_in_llama_cpp_beside_transformers(llama_built, gpt2_tokenizer, tmp_path, capsys):
    import json

    from smartprune.cli.main import main

    folder, model = _folder(tmp_path, "llama", gpt2_tokenizer)
    gguf = write_gguf(model, tmp_path / "m-q8_0.gguf", tokenizer=gpt2_tokenizer, gguf_type="q8_0")
    out = tmp_path / "bench.json"
    code = main(["-q", "bench", str(folder), str(gguf), "--repeats", "2", "--lengths", "16", "--new-tokens", "4",
                 "--threads", "1", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    dense, llama = json.loads(out.read_text())["models"]
    assert llama["resident"] == "llama.cpp" and "Q8_0" in llama["compute_dtype"]
    for row in (dense, llama):
        m = row["metrics"]
        assert m["generate_tokens_per_s"] > 0 and m["latency_b1_16"] > 0 and m["peak_rss_bytes"] > 0
        assert m["decode_weight_gb_per_s"] == pytest.approx(m["resident_bytes"] * m["generate_tokens_per_s"] / 1e9)
    assert llama["metrics"]["resident_bytes"] < dense["metrics"]["resident_bytes"]  # 8-bit blocks
    assert llama["ratios"]["generate_tokens_per_s"] > 0  # against the first MODEL, another runtime
    assert "llama.cpp" in (tmp_path / "bench.md").read_text()
    code = main(["-q", "bench", str(folder), str(tmp_path / "missing.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "no such GGUF file" in err and err.count("\n") == 1
