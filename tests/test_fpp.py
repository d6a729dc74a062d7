"""Forward Propagation Pruning: sign balance, schedules and frozen masks."""

import pytest
import torch

from smartprune.adapters import get_adapter
from smartprune.errors import RecipeError
from smartprune.methods.base import Sublayer
from smartprune.methods.fpp import FPPStage, fpp_rates, sign_balanced_mask
from smartprune.recipes import FPPConfig, StrategyConfig

from .conftest import tiny_model

W = torch.tensor([0.5, -0.1, 0.2, -0.7, 0.05, -0.3, 0.9, -0.02])


def test_magnitude_removes_the_weights_of_each_sign_closest_to_zero():
    keep = sign_balanced_mask(W, None, 1, 1, "magnitude")
    assert (~keep).nonzero().flatten().tolist() == [4, 7]  # 0.05 and -0.02
    keep = sign_balanced_mask(W, keep, 1, 2, "magnitude")
    assert (~keep).nonzero().flatten().tolist() == [1, 2, 4, 5, 7]  # then 0.2, -0.1, -0.3


def test_literal_removes_the_largest_positive_and_most_negative():
    keep = sign_balanced_mask(W, None, 1, 1, "literal")
    assert (~keep).nonzero().flatten().tolist() == [3, 6]  # -0.7 and 0.9


def test_a_sign_that_runs_out_hands_its_share_to_the_other():
    keep = sign_balanced_mask(torch.tensor([1.0, 2.0, 3.0, 4.0]), None, 1, 1, "magnitude")
    assert keep.tolist() == [False, False, True, True]


def test_schedule_steps_by_p_pos_plus_p_neg_and_stops_at_target():
    assert fpp_rates(FPPConfig(target_sparsity=0.3, p_pos=0.05, p_neg=0.05)) == pytest.approx([0.1, 0.2, 0.3])
    assert fpp_rates(FPPConfig(target_sparsity=0.25, p_pos=0.05, p_neg=0.05)) == pytest.approx([0.1, 0.2, 0.25])
    assert fpp_rates(FPPConfig(target_sparsity=0.7, max_it=2)) == pytest.approx([0.1, 0.2])
    with pytest.raises(RecipeError):
        fpp_rates(FPPConfig(target_sparsity=0.5, p_pos=0.0, p_neg=0.0))


def test_each_iteration_zeroes_p_pos_positive_and_p_neg_negative_weights():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    sub = Sublayer(adapter, "ff", 0, adapter.ff_paths(0))
    cfg = FPPConfig(target_sparsity=0.6, p_pos=0.1, p_neg=0.05, steps=0)
    stage = FPPStage(cfg, sub, torch.Generator())
    up = sub.module("up")
    n = up.weight.numel()  # 32 x 64 = 2048
    before = up.weight.detach().clone()
    prev_pos = prev_neg = 0
    for rate in stage.schedule(StrategyConfig()):
        stage.compress_to(rate)
        gone = ~up.mask
        pos, neg = int((gone & (before >= 0)).sum()), int((gone & (before < 0)).sum())
        new_pos, new_neg = pos - prev_pos, neg - prev_neg
        assert new_pos + new_neg == round(rate * n) - (prev_pos + prev_neg)
        assert abs(new_pos - 2 * new_neg) <= 2  # p_pos : p_neg = 2 : 1
        prev_pos, prev_neg = pos, neg
        assert torch.equal(up.weight[gone], torch.zeros(int(gone.sum())))
    assert prev_pos + prev_neg == round(0.6 * n)


def test_neuron_scores_are_signed_norms_by_hand():
    from smartprune.methods.fpp import neuron_scores

    up = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # d=2 x k=2: neuron 0 column (3, 0), neuron 1 (0, 1)
    down = torch.tensor([[4.0, 0.0], [-1.0, -1.0]])  # neuron 0 row (4, 0), sum > 0; neuron 1 (-1, -1), sum < 0
    assert torch.allclose(neuron_scores([up], down), torch.tensor([5.0, -(3.0 ** 0.5)]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_structured_fpp_leaves_smaller_dense_matrices_and_still_generates(arch, calib):
    from smartprune.engine import compress
    from smartprune.nn import Projection
    from smartprune.recipes import load_recipe

    from .conftest import tiny_model

    model = tiny_model(arch)
    result = compress(model, None, load_recipe("paper-structured"), calib=calib, progress=False)
    k = 128 if arch == "gpt2" else 64  # the tiny configs' intermediate sizes
    kept = k - round(0.7 * k)
    for i in range(len(result.adapter.blocks())):
        *inputs, output = result.adapter.ff_projections(i).values()
        assert all(isinstance(p, Projection) and p.mask is None for p in [*inputs, output])
        assert all(p.weight.shape == (32, kept) for p in inputs)
        assert output.weight.shape == (kept, 32)
    assert result.report["groups"]["fpp_ff"]["c_ub"] >= 0.7
    out = model.generate(calib.ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_neuron_structure_is_refused_for_the_embedding():
    from smartprune.recipes.schema import build_recipe

    with pytest.raises(RecipeError, match=r"fpp_emb\.structure"):
        build_recipe({"fpp_emb": {"structure": "neuron"}}, "x", "x")
