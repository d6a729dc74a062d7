"""Adapters: one orientation for every family, exact block-by-block execution, clean refusals."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from smartprune.adapters import get_adapter
from smartprune.errors import ModelError
from smartprune.modules.masked import FusedProjections, Projection

from .conftest import tiny_model


@pytest.mark.parametrize("config", [
    Qwen2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100),
    MistralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100),
], ids=["qwen2", "mistral"])
def test_llama_layout_families(config):
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        adapter = get_adapter(model)
        assert torch.allclose(adapter.forward_logits(ids), ref, atol=1e-5)


def test_block_by_block_equals_model_forward_before_and_after_conversion(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        adapter = get_adapter(model)
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)
        assert torch.allclose(adapter.forward_logits(ids), ref, atol=1e-5)
        adapter.materialize()
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)


def test_projections_are_in_paper_orientation(kind):
    model = tiny_model(kind)
    adapter = get_adapter(model)
    att = adapter.attention_projections(0)
    assert all(isinstance(p, Projection) for p in att.as_dict().values())
    assert att.q.weight.shape == (32, 32)  # d_in x d_out
    if kind == "llama":
        assert att.k.weight.shape == (32, 16) and att.v.weight.shape == (32, 16)  # GQA: 2 of 4 heads
        assert adapter.ff_projections(0)["down"].weight.shape == (64, 32)
        assert model.lm_head.weight is adapter.embeddings()["model.embed_tokens"].weight  # tie kept
    else:
        assert isinstance(model.transformer.h[0].attn.c_attn, FusedProjections)
        assert adapter.ff_projections(0)["c_fc"].weight.shape == (32, 128)
        assert set(adapter.embeddings()) == {"transformer.wte", "transformer.wpe"}


def test_a_model_without_entry_gets_the_generic_adapter_and_the_paper_a_reason():
    from transformers import BertConfig, BertLMHeadModel

    from smartprune.adapters import GenericAdapter, paper_methods_unsupported

    model = BertLMHeadModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=100, is_decoder=True))
    adapter = get_adapter(model)
    assert isinstance(adapter, GenericAdapter) and adapter.blocks_path() == "bert.encoder.layer"
    assert list(adapter.linear_paths(0)) == ["attention.self.query", "attention.self.key", "attention.self.value",
                                             "attention.output.dense", "intermediate.dense", "output.dense"]
    assert paper_methods_unsupported(model.config).startswith("model type 'bert' has no entry in smartprune's "
                                                              "adapter table")
    with pytest.raises(ModelError, match="the output head of a bert model is not known here"):
        adapter.head(torch.zeros(1, 2, 32))
