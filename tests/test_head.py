"""The output head options: a low-rank head fitted to hidden states, and an untied dense head."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from smartprune.compression.engine import check_recipe_for, compress
from smartprune.errors import ModelError
from smartprune.modules.head import LowRankHead, head_gram, low_rank_head
from smartprune.recipes import load_recipe
from smartprune.recipes.schema import build_recipe
from smartprune.storage.load import load
from smartprune.storage.save import save, write_dense

from .conftest import tiny_model


class _Toy(torch.nn.Module):
    """Just a head, for the factorization by hand: the input embeddings are a separate table."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.emb = torch.nn.Embedding(*w.shape)
        self.head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.head.weight.data = w.clone()

    def get_output_embeddings(self):
        return self.head

    def get_input_embeddings(self):
        return self.emb

    def set_output_embeddings(self, m):
        self.head = m

    def forward(self, h):
        return self.head(h)


def test_a_data_aware_low_rank_head_is_exact_on_the_subspace_the_states_span():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    basis = torch.randn(2, 4, generator=g)
    h = torch.randn(50, 2, generator=g) @ basis  # every hidden state lies in a 2-D subspace
    gram = (h.double().t() @ h.double()) / h.shape[0]
    aware, plain = _Toy(w), _Toy(w)
    assert low_rank_head(aware, 2, gram) == 2 * (4 + 6) - 6 * 4  # an untied head: its own matrix goes
    low_rank_head(plain, 2)
    assert isinstance(aware.head, LowRankHead) and aware.head.rank == 2
    with torch.no_grad():
        assert torch.allclose(aware(h), h @ w.t(), atol=1e-4)  # rank 2 suffices for states of rank 2
        assert not torch.allclose(plain(h), h @ w.t(), atol=1e-2)  # the weight's own SVD does not know that
        u, s, vh = torch.linalg.svd(w)
        assert torch.allclose(plain.head.to_linear().weight, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)


def test_low_rank_recipe_section_compresses_saves_loads_and_exports(calib, tmp_path):
    recipe = build_recipe({"fpp_ff": {"target_sparsity": 0.5}, "head": {"kind": "low-rank", "rank": 8}}, "t", "test")
    model = tiny_model("llama")
    result = compress(model, None, recipe, calib=calib, progress=False)
    assert isinstance(model.lm_head, LowRankHead) and not model.config.tie_word_embeddings
    assert result.report["overall"]["head_params_added"] == 8 * (32 + 100)  # the tied head was free
    save(model, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "smartprune.json").read_text())["modules"]["lm_head"]["kind"] == "low_rank"
    write_dense(model, tmp_path / "d")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        want = model(calib.ids).logits
        for other in (load(tmp_path / "c"), load(tmp_path / "c", resident="dense"), vanilla):
            assert torch.allclose(other(calib.ids).logits, want, atol=1e-5)


def test_untied_head_stays_dense_while_the_embedding_is_pruned(calib, tmp_path):
    recipe = build_recipe({"fpp_emb": {"target_sparsity": 0.7, "steps": 0}, "head": {"kind": "untie"}}, "t", "test")
    model = tiny_model("llama")
    original = model.lm_head.weight.detach().clone()
    result = compress(model, None, recipe, calib=calib, progress=False)
    assert (model.model.embed_tokens.weight == 0).float().mean() > 0.6
    assert torch.equal(model.lm_head.weight, original)
    assert result.report["overall"]["head_params_added"] == 100 * 32
    save(model, tmp_path / "c")
    loaded = load(tmp_path / "c")
    with torch.no_grad():
        assert torch.allclose(loaded(calib.ids).logits, model(calib.ids).logits, atol=1e-5)


def test_head_gram_is_the_second_moment_of_the_final_states(calib):
    model = tiny_model("llama")
    seen = []
    model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 32).double()))
    gram = head_gram(model, calib.ids)
    h = torch.cat(seen)
    assert torch.allclose(gram, h.t() @ h / h.shape[0])


def test_a_rank_not_below_the_hidden_size_is_refused_before_work():
    recipe = build_recipe({"fpp_ff": {}, "head": {"rank": 32}}, "t", "test")
    with pytest.raises(ModelError, match="head rank 32 is not below the hidden size 32"):
        check_recipe_for(tiny_model("llama").config, recipe)
    check_recipe_for(tiny_model("llama").config, load_recipe("paper"))  # no head section: nothing to check
