"""Forward Propagation Pruning: sign balance, schedules and frozen masks."""

import pytest
import torch

from smartprune.adapters import get_adapter
from smartprune.errors import RecipeError
from smartprune.methods.base import Sublayer
from smartprune.methods.config import StrategyConfig
from smartprune.methods.fpp import FPPConfig, FPPStage, fpp_rates, sign_balanced_mask
from smartprune.recipes.schema import build_recipe

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
    from smartprune.compression.engine import compress
    from smartprune.modules.masked import Projection
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


def _correlated_layer(seed: int = 0):
    """Inputs whose 32 features mix 8 latent ones (strongly correlated, of unequal scales), a random
    32 x 24 matrix, and the input Gram matrix."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 32, generator=g) * torch.linspace(0.2, 3, 32)
    x = x + 0.05 * torch.randn(512, 32, generator=g)
    w = torch.randn(32, 24, generator=g)
    return x, w, (x.T @ x).double()


def _error(x, w, new) -> float:
    return float((x @ (w - new)).pow(2).sum() / (x @ w).pow(2).sum())


def test_obs_and_wanda_reconstruct_better_than_magnitude_at_equal_sparsity():
    from smartprune.methods.fpp import fpp_increment

    x, w, gram = _correlated_layer()
    errors = {}
    for crit in ("magnitude", "wanda", "obs"):
        new, alive = fpp_increment(w, None, 192, 192, crit, None if crit == "magnitude" else gram)
        assert int((~alive).sum()) == 384 and not new[~alive].any()  # half of 768 entries, exactly zero
        assert int((~alive & (w >= 0)).sum()) == 192  # the paper's sign balance is kept
        errors[crit] = _error(x, w, new)
    assert errors["obs"] < 0.5 * errors["magnitude"] and errors["wanda"] < errors["magnitude"], errors


def test_wanda_score_is_weight_times_input_norm_by_hand():
    from smartprune.methods.fpp import criterion_score

    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # rows: input features 0 and 1
    gram = torch.tensor([[4.0, 0.0], [0.0, 0.25]], dtype=torch.float64)  # ||X_0|| = 2, ||X_1|| = 0.5
    assert criterion_score(w, "wanda", gram).tolist() == [[2.0, 4.0], [1.5, 0.25]]


def test_one_wanda_score_serves_both_layouts_and_the_registry_feeds_every_choice_list():
    from smartprune.methods.criteria import CRITERIA, needing, offered, wanda_score
    from smartprune.methods.fpp import FPPConfig
    from smartprune.methods.heads import HeadsConfig
    from smartprune.methods.neurons import NeuronsConfig
    from smartprune.recipes.schema import OverallConfig

    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # rows: input features 0 and 1
    norms = torch.tensor([2.0, 0.5])
    assert wanda_score(w, norms).tolist() == [[2.0, 4.0], [1.5, 0.25]]
    assert wanda_score(w.T, norms, inputs=1).tolist() == [[2.0, 1.5], [4.0, 0.25]]  # torch's (d_out, d_in)
    assert FPPConfig.__dataclass_fields__["criterion"].metadata["choices"] == (
        "magnitude", "literal", "wanda", "obs", "frequency")
    for cls in (NeuronsConfig, HeadsConfig):
        assert cls.__dataclass_fields__["criterion"].metadata["choices"] == ("activation", "magnitude")
    assert OverallConfig.__dataclass_fields__["emb_criterion"].metadata["choices"] == ("magnitude", "frequency")
    assert needing("input activations") == ("wanda", "obs") and set(offered("fpp")) < set(CRITERIA)


def test_frequency_prunes_rows_the_text_never_uses_first():
    from smartprune.methods.fpp import fpp_increment

    e = torch.tensor([[0.1, -0.1], [0.5, -0.5], [0.2, -0.2]])  # row 1 is large but never looked up
    counts = torch.tensor([99, 0, 99])
    _, alive = fpp_increment(e, None, 1, 1, "frequency", counts)
    assert alive.tolist() == [[True, True], [False, False], [True, True]]  # magnitude would take row 0


@pytest.mark.parametrize("recipe, message", [
    ({"fpp_emb": {"criterion": "obs"}}, "needs a layer's input activations"),
    ({"fpp_emb": {"criterion": "wanda"}}, "needs a layer's input activations"),
    ({"fpp_ff": {"criterion": "frequency"}}, "counts embedding lookups"),
    ({"fpp_ff": {"criterion": "obs", "structure": "neuron"}}, "whole neurons are ranked by their weights"),
])
def test_criteria_that_do_not_fit_the_matrix_are_refused(recipe, message):
    from smartprune.recipes.schema import build_recipe

    with pytest.raises(RecipeError, match=message):
        build_recipe(recipe, "r", "test")


@pytest.mark.parametrize("criterion", ["wanda", "obs"])
def test_the_engine_runs_each_criterion_and_obs_fits_the_blocks_best(criterion, kind, calib):
    from smartprune.compression.engine import compress
    from smartprune.recipes.schema import build_recipe

    errors = {}
    for crit in ("magnitude", criterion):
        model = tiny_model(kind)
        recipe = build_recipe({"fpp_ff": {"target_sparsity": 0.6, "criterion": crit, "steps": 0},
                               "fpp_emb": {"target_sparsity": 0.5, "criterion": "frequency", "steps": 0}},
                              crit, "test")
        report = compress(model, None, recipe, calib=calib, progress=False).report
        ff = [r for r in report["layers"] if r["stage"] == "fpp_ff"]
        assert all(r["rate"] == pytest.approx(0.6) for r in ff)
        errors[crit] = sum(r["relative_error"] for r in ff)
    assert errors[criterion] < errors["magnitude"], errors


def test_lookups_count_tokens_for_the_token_table_and_positions_for_the_position_table():
    from smartprune.methods.fpp import lookup_counts

    model = tiny_model("gpt2")
    adapter = get_adapter(model)
    ids = torch.tensor([[5, 5, 7], [7, 9, 5]])
    tokens, positions = lookup_counts(adapter.embed, ids, [model.transformer.wte, model.transformer.wpe])
    assert tokens[5] == 3 and tokens[7] == 2 and tokens[9] == 1 and int(tokens.sum()) == 6
    # the position table is looked up once per batch (positions broadcast over the windows): by position,
    # not by token id
    assert positions[:3].tolist() == [1, 1, 1] and int(positions[3:].sum()) == 0


def test_nm_pattern_takes_positives_first_within_each_groups_room_by_hand():
    from smartprune.methods.fpp import nm_balanced_mask

    w = torch.tensor([[0.1, -0.2, 0.3, -0.4, 0.5, 0.6, 0.7, 0.8],
                      [-0.1, -0.2, -0.3, -0.4, 0.9, -0.05, 0.01, 0.02]])
    # groups of 4 along axis 1. Positives (4): of each group's room of 2, the lowest positives are
    # eligible: 0.1, 0.3 | 0.5, 0.6 | none | 0.01, 0.02; the 4 lowest go: 0.01, 0.02, 0.1, 0.3.
    # Negatives (4): only the third group has room (-0.1, -0.2). The 2 still missing come from
    # either sign where room is left: the second group's 0.5 and 0.6.
    keep = nm_balanced_mask(w, None, 4, 4, "magnitude", None, (2, 4), axis=1)
    assert keep.int().tolist() == [[0, 1, 0, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]]
    # the same matrix laid out d_in x d_out (axis 0): the same choice, transposed
    assert torch.equal(nm_balanced_mask(w.T, None, 4, 4, "magnitude", None, (2, 4), axis=0), keep.T)


def test_fpp_with_a_2_4_pattern_ends_with_exactly_two_of_every_four_inputs(calib):
    from smartprune.compression.engine import compress
    from smartprune.modules.masked import Projection

    model = tiny_model("llama")
    recipe = build_recipe({"fpp_emb": {"pattern": "2:4", "steps": 1}, "fpp_ff": {"pattern": "2:4", "steps": 1}},
                          "r", "test")
    assert recipe.stages["fpp_ff"].target_sparsity == 0.5
    compress(model, None, recipe, calib=calib, progress=False)
    masks = [m.mask.T for m in model.modules() if type(m) is Projection and m.mask is not None]  # (out, in)
    masks.append(model.get_input_embeddings().mask)  # (vocab, hidden): hidden are the tied head's inputs
    assert len(masks) == 7  # gate, up, down of 2 blocks; the table
    for mask in masks:
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()


def test_nm_pattern_excludes_neuron_structure_and_allocation():
    with pytest.raises(RecipeError, match="neuron"):
        build_recipe({"fpp_ff": {"pattern": "2:4", "structure": "neuron"}}, "r", "test")
    with pytest.raises(RecipeError, match="N:M"):
        build_recipe({"fpp_emb": {"pattern": "2:4"}, "sparsegpt": {}, "overall": {"target": 0.5}}, "r", "test")
