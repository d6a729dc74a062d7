"""Shared fixtures: tiny random GPT-2 and Llama (GQA) models, synthetic calibration, a small data folder."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from smartprune.data import Calibration

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and CI may share the cores


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
VOCAB = 50257  # the real GPT-2 tokenizer's size, so CLI tests run on real tokenization


def tiny_config(kind: str, vocab: int = 100):
    if kind == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    return LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def tiny_model(kind: str, vocab: int = 100, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab), attn_implementation="sdpa")
    # Larger-than-default weights so attention is far from uniform and compression visibly matters.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def pattern_ids(count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Windows of a patterned token stream (a few interleaved arithmetic progressions mod 100)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 1000, (count,), generator=g)
    pos = starts[:, None] + torch.arange(seqlen)[None, :]
    return (pos * 7 + (pos % 3) * 11) % 100


def trained_tiny_model(kind: str, steps: int = 150):
    """A tiny model trained briefly on `pattern_ids`, so it predicts well and compression hurts it."""
    model = tiny_model(kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        ids = pattern_ids(16, 16, seed=step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture
def pattern_calib() -> Calibration:
    return Calibration(pattern_ids(12, 16, seed=10_001), pattern_ids(3, 16, seed=10_002), "pattern")


@pytest.fixture(params=["gpt2", "llama"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def calib() -> Calibration:
    g = torch.Generator().manual_seed(1)
    return Calibration(torch.randint(0, 100, (12, 16), generator=g), torch.randint(0, 100, (3, 16), generator=g),
                       "synthetic")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    if not GPT2_TOKENIZER.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {GPT2_TOKENIZER}")
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, gpt2_tokenizer) -> dict[str, Path]:
    """Tiny GPT-2 and Llama-GQA folders (random weights, real GPT-2 tokenizer) as from_pretrained reads them."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for k in ("gpt2", "llama"):
        model = tiny_model(k, VOCAB)
        model.save_pretrained(root / k)
        gpt2_tokenizer.save_pretrained(root / k)
        out[k] = root / k
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small data folder with the layout of ../shared/data (real text, cut short for speed)."""
    root = tmp_path_factory.mktemp("data")
    real = SHARED_DATA / "wikitext-2" / "wiki.train.tokens"
    text = real.read_text()[:200_000] if real.is_file() else ("the cat sat on the mat .\n" * 5000)
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "wiki.train.tokens").write_text(text)
    valid = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"
    (root / "wikitext-2" / "wiki.valid.tokens").write_text(valid.read_text()[:40_000] if valid.is_file()
                                                            else text[-40_000:])
    (root / "wikitext-2-raw").mkdir()
    raw = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(raw.read_text()[:40_000] if raw.is_file() else text[:40_000])
    (root / "ptb").mkdir()
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        src = SHARED_DATA / "ptb" / name
        (root / "ptb" / name).write_text(src.read_text()[:40_000] if src.is_file() else text[:40_000])
    _write_classification_data(root)
    if GPT2_TOKENIZER.is_dir():
        shutil.copytree(GPT2_TOKENIZER, root / "gpt2-tokenizer")
    return root


def _write_classification_data(root: Path) -> None:
    """Tiny synthetic files in the GLUE / SMS layouts (SST-2 train+dev, RTE dev only, SMS)."""
    good = ["a charming and affecting journey", "a wonderful , moving film", "bright and funny", "truly great"]
    bad = ["bleak and desperate", "a dull , tedious mess", "boring and flat", "truly awful"]
    rows = [(t, 1) for t in good] + [(t, 0) for t in bad]
    sst = root / "glue" / "SST-2"
    sst.mkdir(parents=True)
    for split, reps in (("train", 3), ("dev", 1)):
        body = "".join(f"{t} \t{y}\n" for t, y in rows * reps)
        (sst / f"{split}.tsv").write_text("sentence\tlabel\n" + body)
    rte = root / "glue" / "RTE"
    rte.mkdir(parents=True)
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"
                                 "0\tA cat sat on the mat.\tA cat sat.\tentailment\n"
                                 "1\tA dog ran \"fast\".\tA cat sat.\tnot_entailment\n")
    sms = root / "sms"
    sms.mkdir()
    lines = [f"ham\tsee you at {i} tonight" for i in range(8)] + [f"spam\tWIN {i} prizes now" for i in range(2)]
    (sms / "SMSSpamCollection").write_text("\n".join(lines * 5) + "\n")


@pytest.fixture
def use_data(monkeypatch, data_dir) -> Path:
    monkeypatch.setenv("SMARTPRUNE_DATA", str(data_dir))
    return data_dir


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(items) -> None:
    """Tests that take the `device` fixture are marked `device`: `pytest -m device -k cuda` runs them
    on a GPU alone (benchmarks/gpu.py)."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Device-generic tests run on the CPU everywhere and on the GPU too where torch sees one."""
    return request.param


@pytest.fixture
def compressed(kind):
    """A tiny model of `kind` (GPT-2 vocabulary) compressed with `paper`, and its dense teacher."""
    model = tiny_model(kind, VOCAB)
    teacher = copy.deepcopy(model)
    from smartprune.compression.engine import compress
    from smartprune.recipes import load_recipe

    ids = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(0))
    compress(model, None, load_recipe("paper"), calib=Calibration(ids, ids[:3], "synthetic"), progress=False)
    return model, teacher
