"""Model families beyond GPT-2 and Llama: a tiny random model of each (built from its transformers
config, the real GPT-2 tokenizer) through the adapter, `compress` with the paper's recipe and with
SparseGPT, the `--dense-out` export in vanilla transformers, greedy generation and `eval`; and a
family without a table entry (Bloom) through everything that needs no roles."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import smartprune
from smartprune.adapters import GenericAdapter, LayoutAdapter, get_adapter
from smartprune.adapters.install import coverage
from smartprune.cli.main import main
from smartprune.modules.masked import FoldedProjection, Projection
from smartprune.modules.structured import HeadNorm, IRCAttention
from smartprune.testing import FAMILIES, family_config, family_model

from .conftest import VOCAB


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, gpt2_tokenizer):
    root = tmp_path_factory.mktemp("families")
    for name in [*FAMILIES, "bloom"]:
        family_model(name).save_pretrained(root / name)
        gpt2_tokenizer.save_pretrained(root / name)
    return root


def run(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", [*FAMILIES, "bloom"])
def test_block_by_block_and_split_layers_equal_the_model(name):
    model = family_model(name, vocab=100)
    ids = torch.randint(0, 100, (2, 20))  # longer than the sliding windows (8)
    with torch.no_grad():
        expected = model(ids).logits
        adapter = get_adapter(model)  # fused layers split, native layers converted
        assert isinstance(adapter, GenericAdapter if name == "bloom" else LayoutAdapter)
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
        assert torch.allclose(adapter.forward_logits(ids), expected, atol=1e-5)
        adapter.materialize()
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    assert not any(isinstance(m, Projection) for m in model.modules())


def test_generic_adapter_finds_blocks_linears_and_data_flow_groups():
    adapter = get_adapter(family_model("bloom", vocab=100))
    assert adapter.blocks_path() == "transformer.h"
    roles = list(adapter.linear_paths(0))
    assert roles == ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h"]
    assert adapter.prune_groups("block", roles) == [[r] for r in roles]  # each reads a new tensor
    from smartprune.reporting.figures import layer_weights

    assert list(layer_weights(adapter.model, 1)) == roles  # the before/after pictures need no roles either
    generic = GenericAdapter(family_model("qwen3", vocab=100), "test")
    assert generic.prune_groups("block", list(generic.linear_paths(0)))[:3] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"]]


def test_head_norm_scalar_by_hand():
    """norm(s q) = t(s) (q * g) with t(s) = s / sqrt(s^2 mean(q^2) + eps): one head, numbers by hand."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(2, eps=1.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 3.0]))
    q = FoldedProjection(torch.zeros(3, 2), None, torch.ones(3, dtype=torch.bool), torch.tensor([3.0, 4.0]))
    attn = IRCAttention(q, q, Projection(torch.eye(3)[:, :2]), Projection(torch.eye(2)), n_heads=1, n_kv=1,
                        head_dim=2, layer_idx=0, rope=None, q_norm=HeadNorm(norm, 1.0), k_norm=HeadNorm(norm, 1.0))
    # s = 2: mean(q^2) = 12.5, t = 2 / sqrt(4 * 12.5 + 1) = 2 / sqrt(51); u = (6, 12)
    t = attn.head_scalars(torch.tensor([[2.0]]), "q")
    assert torch.allclose(t, torch.tensor(2 / 51 ** 0.5))
    u, _ = attn._vectors()
    assert torch.allclose(u, torch.tensor([[6.0, 12.0]]))
    assert torch.allclose(t * u, norm(2 * torch.tensor([3.0, 4.0])))


# What structured inference runs for each family's attention after `paper` (IRC folds every Q/K row).
_IRC = "IRC attention"
COVERAGE = {"qwen3": _IRC, "gemma3_text": _IRC, "phi3": _IRC, "opt": _IRC, "gpt_neox_nobias": _IRC, "mistral": _IRC,
            "gpt_neox": "attention: reference path (RoPE with a Q/K bias (Qwen 2, GPT-NeoX) has no closed offset form "
                        "here)"}


@pytest.mark.parametrize("name", FAMILIES)
def test_paper_and_sparsegpt_compress_export_generate_and_eval(name, family_dirs, use_data, tmp_path, capsys):
    sparsegpt = tmp_path / "sparsegpt.yaml"
    sparsegpt.write_text("sparsegpt: {sparsity: 0.5}\n")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    for recipe in ("paper", sparsegpt):
        out, dense = tmp_path / f"out-{recipe == 'paper'}", tmp_path / f"dense-{recipe == 'paper'}"
        code, stdout, err = run(capsys, "compress", family_dirs / name, "--recipe", recipe, "--out", out,
                                "--dense-out", dense, "--calib-samples", "8", "--calib-seqlen", "32")
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["overall"]["compression"] > (0.3 if recipe == "paper" else 0.0)  # untied heads stay
        model = smartprune.load(out)  # structured inference where it applies
        vanilla = AutoModelForCausalLM.from_pretrained(dense).eval()
        with torch.no_grad():
            # The structured attention sums in another order than the reference: on this CPU Gemma 3's
            # largest logit difference is 5.8e-4 (logits of size ~3), the other families' below 1e-4.
            assert torch.allclose(model(ids).logits, vanilla(ids).logits, atol=1e-3, rtol=1e-4)
        greedy = dict(max_new_tokens=10, do_sample=False)
        assert torch.equal(model.generate(ids[:1, :4], **greedy), vanilla.generate(ids[:1, :4], **greedy))
        if recipe == "paper":
            attention, v = coverage(smartprune.load(out, structured=False))["0"]
            assert attention == COVERAGE[name]
            assert v in ("diagonal V", "V: dense path (not one entry per output)")  # DWC's rate is data-driven
    code, stdout, err = run(capsys, "eval", family_dirs / name, out, "--seqlen", "32", "--limit", "2")
    assert code == 0, err
    assert "wikitext2" in stdout


def test_a_family_without_entry_gets_evaluation_generation_and_the_baselines(family_dirs, use_data, tmp_path,
                                                                             capsys, monkeypatch):
    bloom = family_dirs / "bloom"
    code, stdout, err = run(capsys, "eval", bloom, "--seqlen", "32", "--limit", "2")
    assert code == 0 and "wikitext2" in stdout, err
    code, stdout, err = run(capsys, "generate", bloom, "--prompt", "The cat", "--lengths", "4")
    assert code == 0 and "The cat" in stdout, err
    wanda = tmp_path / "wanda.yaml"
    wanda.write_text("wanda: {sparsity: 0.5}\n")
    out, dense = tmp_path / "out", tmp_path / "dense"
    code, stdout, err = run(capsys, "compress", bloom, "--recipe", wanda, "--out", out, "--dense-out", dense,
                            "--calib-samples", "8", "--calib-seqlen", "32")
    assert code == 0, err
    assert "block linears" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["groups"]["linear"]["c_ub"] == pytest.approx(0.5, abs=0.01)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.allclose(smartprune.load(out)(ids).logits,
                              AutoModelForCausalLM.from_pretrained(dense).eval()(ids).logits, atol=1e-4)
    # The paper's methods: one line naming what is missing, before the model loads.
    monkeypatch.setattr("smartprune.runs.pipeline.load_model", lambda *_: pytest.fail("loaded the model"))
    code, _, err = run(capsys, "compress", bloom, "--recipe", "paper", "--out", tmp_path / "never")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs fpp_emb, irc, dwc, fpp_ff: model type 'bloom' has no entry in smartprune's adapter table" in err
    assert not (tmp_path / "never").exists()


def test_post_norm_opt_gets_the_baselines_and_a_reason_for_the_paper(tmp_path):
    from smartprune.compression.engine import compress
    from smartprune.errors import ModelError
    from smartprune.recipes import load_recipe

    config = family_config("opt", 100)
    config.do_layer_norm_before = False
    model = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(get_adapter(model), GenericAdapter)
    with pytest.raises(ModelError, match="do_layer_norm_before=False: a post-norm block"):
        compress(model, None, load_recipe("paper"), progress=False)


def test_a_gguf_file_is_converted_once_and_again_when_replaced(tmp_path, monkeypatch, gpt2_tokenizer):
    """Dequantizing is the slow part of loading a GGUF: the converted folder is cached by the file's
    path, size and modification time (the conversion itself is transformers' GGUF loader, patched
    here: no small GGUF of these families exists offline)."""
    import os

    from smartprune.storage import sources as loading

    monkeypatch.setenv("SMARTPRUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(path):
        calls.append(path)
        return family_model("qwen3", vocab=VOCAB), gpt2_tokenizer

    monkeypatch.setattr(loading, "_from_gguf", convert)
    gguf = tmp_path / "tiny-qwen3.gguf"
    gguf.write_bytes(b"GGUF")
    first = loading.load_model(gguf)
    assert first.model.config.model_type == "qwen3" and len(calls) == 1
    assert loading.model_config(gguf).model_type == "qwen3"  # from the cached folder: no second conversion
    second = loading.load_model(gguf)
    assert len(calls) == 1 and second.source == first.source
    assert torch.equal(second.model.lm_head.weight, first.model.lm_head.weight)
    os.utime(gguf, ns=(0, 10**9))  # replaced (another modification time)
    loading.load_model(gguf)
    assert len(calls) == 2


@pytest.mark.slow
def test_the_builtin_gguf_given_as_a_file_loads_like_the_builtin():
    from smartprune.storage import sources as loading

    path = loading._builtin_gguf("smollm2-135m")
    by_file, by_name = loading.load_model(path), loading.load_model("smollm2-135m")
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(by_file.model(ids).logits, by_name.model(ids).logits)


def test_a_builtin_split_across_packages_is_joined_once_into_the_cache(tmp_path, monkeypatch):
    """Gemma-3-270M's GGUF comes in four PyPI packages (data/NAME.partNN each): the parts are found
    without importing them, joined in order into the cache, reused, joined again when a part changed;
    a missing part is one line naming the install command."""
    from smartprune.errors import ModelError
    from smartprune.storage import sources

    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(7)), bytes(range(50, 53)), b"end"]
    for i, chunk in enumerate(chunks):
        data = site / f"sp_fake_part{i + 1}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise ImportError('a part is data, never imported')\n")
        (data / f"fake.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SMARTPRUNE_CACHE", str(tmp_path / "cache"))
    parts = tuple(f"sp_fake_part{i}" for i in (1, 2, 3))
    monkeypatch.setitem(sources.BUILTINS, "fake", sources.Builtin(parts[0], "fake.gguf", "pip install fake", parts))

    joined = sources._builtin_gguf("fake")
    assert joined.read_bytes() == b"".join(chunks)
    assert joined.parent == tmp_path / "cache" / "gguf"
    os.utime(joined, ns=(0, 10**9))
    assert sources._builtin_gguf("fake").stat().st_mtime_ns == 10**9  # reused, not joined again
    (site / "sp_fake_part2" / "data" / "fake.gguf.part01").write_bytes(b"longer part")
    assert sources._builtin_gguf("fake").read_bytes() == chunks[0] + b"longer part" + chunks[2]
    assert [p.name for p in joined.parent.iterdir()] == ["fake.gguf"]  # no temporary file left
    shutil.rmtree(site / "sp_fake_part3")
    with pytest.raises(ModelError, match=r"needs the package sp_fake_part3: run `pip install fake`"):
        sources._builtin_gguf("fake")
