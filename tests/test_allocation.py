"""Allocation by measured sensitivity: exact totals, the convex hull and the greedy split by hand,
and recipes that cannot be allocated refused."""

import pytest

from smartprune.compression.allocation import Unit, _hull, allocate
from smartprune.compression.engine import compress
from smartprune.errors import RecipeError
from smartprune.recipes import load_recipe
from smartprune.recipes.schema import build_recipe

from .conftest import tiny_model
from .test_cli import _one_clean_line, run


def test_the_hull_drops_points_above_it_and_never_falls():
    # measured (0.25, 1), (0.5, 0.5 -> 1 after making it non-decreasing), (0.75, 5), (1, 6)
    assert _hull((0.25, 0.5, 0.75, 1.0), [1.0, 0.5, 5.0, 6.0]) == [(0.0, 0.0), (0.5, 1.0), (1.0, 6.0)]


def test_entries_go_where_the_loss_per_entry_is_lowest():
    units = [Unit("a", ["a"], 100), Unit("b", ["b"], 100)]
    curves = {"a": [1.0, 10.0], "b": [2.0, 3.0]}  # a: 0.02 then 0.18 per entry; b (its hull): 0.03 per entry
    assert allocate(units, curves, (0.5, 1.0), 120) == {"a": 50, "b": 70}
    assert allocate(units, curves, (0.5, 1.0), 40) == {"a": 40, "b": 0}
    with pytest.raises(RecipeError, match="more than the 200"):
        allocate(units, curves, (0.5, 1.0), 201)


def test_a_spread_keeps_every_rate_near_the_mean():
    units = [Unit("a", ["a"], 100), Unit("b", ["b"], 100)]
    curves = {"a": [1.0, 10.0], "b": [2.0, 3.0]}  # unbounded, 120 entries go 50 / 70 (above)
    # 125 entries, unbounded: a's cheap half (50), then b's 0.03 per entry (75)
    assert allocate(units, curves, (0.5, 1.0), 125) == {"a": 50, "b": 75}
    # mean rate 0.625, spread 1/16: both within [0.5625, 0.6875], so 56 each first (56.25 rounded down), then
    # 13 more by slope: b's (0.03 per entry) up to its cap of 69 (68.75 rounded up)
    assert allocate(units, curves, (0.5, 1.0), 125, spread=0.0625) == {"a": 56, "b": 69}
    # spread 0 is uniform; a spread wider than the grid changes nothing
    assert allocate(units, curves, (0.5, 1.0), 120, spread=0.0) == {"a": 60, "b": 60}
    assert allocate(units, curves, (0.5, 1.0), 120, spread=1.0) == {"a": 50, "b": 70}


@pytest.mark.parametrize("target,sensitivity,measured", [(0.3, "joint", 5), (0.5, "wanda", 4)])
def test_the_overall_target_is_met_exactly(target, sensitivity, measured, kind, calib):
    model = tiny_model(kind)
    recipe = load_recipe("smart-50").replace(overall=build_recipe(
        {"overall": {"target": target, "sensitivity": sensitivity}, "sparsegpt": {}}, "x", "test").overall)
    report = compress(model, None, recipe, calib=calib, progress=False).report
    o = report["overall"]
    assert o["params_before"] - o["params_after"] == round(target * o["params_before"])
    units = report["allocation"]["units"]
    assert {u["unit"] for u in units} >= {"embedding", "block 0 qk", "block 1 ff"}
    # joint: the mean and two moves each side; single-unit: the 4-rate grid up to max_rate
    assert all(0 <= round(u["rate"] * u["entries"]) <= round(0.9 * u["entries"]) and
               len(u["loss_increase"]) == measured for u in units)  # no matrix past max_rate


def test_an_overall_section_measures_jointly_unless_it_says_otherwise():
    from smartprune.recipes.schema import GRID_POINTS, JOINT_POINTS, JOINT_SPREAD

    joint = build_recipe({"overall": {"target": 0.4}, "sparsegpt": {}}, "x", "test").overall
    assert (joint.sensitivity, joint.points, joint.spread) == ("joint", JOINT_POINTS, JOINT_SPREAD)
    alone = build_recipe({"overall": {"sensitivity": "wanda"}, "sparsegpt": {}}, "x", "test").overall
    assert (alone.points, alone.spread) == (GRID_POINTS, None)  # the grid up to max_rate, unbounded
    given = build_recipe({"overall": {"points": 2, "spread": 0.1}, "sparsegpt": {}}, "x", "test").overall
    assert (given.sensitivity, given.points, given.spread) == ("joint", 2, 0.1)
    with pytest.raises(RecipeError, match="spread 0 leaves it nothing"):
        build_recipe({"overall": {"spread": 0}, "sparsegpt": {}}, "x", "test")


def test_a_recipe_spread_bounds_every_units_rate_in_the_model(calib):
    model = tiny_model("llama")
    recipe = load_recipe("smart-50").replace(overall=build_recipe(
        {"overall": {"target": 0.3, "spread": 0.05}, "sparsegpt": {}}, "x", "test").overall)
    report = compress(model, None, recipe, calib=calib, progress=False).report
    o, units = report["overall"], report["allocation"]["units"]
    assert o["params_before"] - o["params_after"] == round(0.3 * o["params_before"]) and \
        report["allocation"]["spread"] == 0.05
    mean = sum(round(u["rate"] * u["entries"]) for u in units) / sum(u["entries"] for u in units)
    # bounds rounded outwards to whole entries: one entry of slack per unit
    assert all(mean - 0.05 - 1 / u["entries"] <= u["rate"] <= mean + 0.05 + 1 / u["entries"] for u in units)
    assert max(u["rate"] for u in units) - min(u["rate"] for u in units) > 0.05  # not simply uniform


@pytest.mark.parametrize("recipe, message", [
    ({"overall": {}, "irc": {}}, "remove irc"),
    ({"overall": {}, "sparsegpt": {}, "wanda": {}}, "one pruning stage at most"),
    ({"overall": {}, "magnitude": {"scope": "global"}}, "exclude magnitude scope 'global'"),
    ({"overall": {"target": 1.5}, "sparsegpt": {}}, "outside"),
])
def test_recipes_the_allocation_cannot_serve_are_refused(recipe, message):
    with pytest.raises(RecipeError, match=message):
        build_recipe(recipe, "r", "test")


def test_compress_with_a_target_prints_the_allocation(model_dirs, use_data, tmp_path, capsys):
    code, out, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "smart", "--target-compression", "0.4",
                         "--out", tmp_path / "c", "--calib-samples", "8", "--calib-seqlen", "16")
    assert code == 0, err
    assert "allocation for 40.00% overall" in out and "| 1 | " in out and "| **mean** |" in out
    assert "overall compression 40.00%" in out and "embedding: " in out
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "paper", "--target-compression", "0.4",
                       "--out", tmp_path / "d")
    assert code == 2 and "needs a recipe with an overall section" in _one_clean_line(err)


def test_compare_puts_smart_beside_the_peers_at_equal_size(model_dirs, use_data, tmp_path, capsys):
    import json

    # the tiny model's embedding (GPT-2 vocabulary) holds 99% of its parameters: a small target
    recipe = tmp_path / "smart-tiny.yaml"
    recipe.write_text("overall: {target: 0.01}\nfpp_emb: {criterion: frequency, steps: 0}\nsparsegpt: {}\n"
                      "calibration: {eval_samples: 2}\n")  # its own held-out windows: the joint measurement's
    code, _, err = run(capsys, "compare", model_dirs["llama"], "--methods", f"{recipe},sparsegpt,wanda", "--sparsity",
                       f"match:{recipe}", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "64",
                       "--calib-samples", "8", "--calib-seqlen", "16", "--json", tmp_path / "c.json")
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    assert rows[str(recipe)]["compression"] == pytest.approx(0.01, abs=1e-6)
    assert rows[str(recipe)]["allocation"]["target"] == 0.01
    assert rows[str(recipe)]["calibration"] == {"text": "wikitext2", "samples": 8, "seqlen": 16, "eval_samples": 2}
    for peer in ("sparsegpt", "wanda"):  # the same number of parameters removed, within one per matrix
        assert rows[peer]["compression"] == pytest.approx(0.01, abs=1e-5)
        assert rows[peer]["calibration"] == {"text": "wikitext2", "samples": 8, "seqlen": 16, "eval_samples": 4}


def test_scored_by_its_stage_a_unit_is_pruned_as_sparsegpt_will_prune_it(calib):
    """`sensitivity: stage` measures each unit after SparseGPT's own pruning (the surviving weights
    updated): the same zeros count as Wanda's scoring, and a smaller error in the layer's output."""
    import torch

    from smartprune.adapters import get_adapter
    from smartprune.compression.allocation import block_pruner

    model = tiny_model("llama")
    adapter = get_adapter(model)
    path = list(adapter.ff_paths(0).values())[-1]  # the feed-forward output matrix of block 0
    w = model.get_submodule(path).weight
    x = []
    hook = model.get_submodule(path).register_forward_pre_hook(lambda m, a: x.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib.ids)
    hook.remove()
    x = torch.cat(x).double()
    errors = {}
    for how in ("wanda", "sparsegpt"):
        pruned = w.detach().clone()
        block_pruner(model, [path], calib.ids, how)(path, pruned, 0.6)
        assert int((pruned == 0).sum()) == round(0.6 * w.numel())
        errors[how] = float((x @ (pruned.double() - w.detach().double())).norm())
    assert errors["sparsegpt"] < errors["wanda"]


def test_the_allocation_reports_how_it_scored_units(kind, calib):
    model = tiny_model(kind)
    recipe = build_recipe({"overall": {"target": 0.3, "sensitivity": "stage"}, "sparsegpt": {}}, "x", "test")
    report = compress(model, None, recipe, calib=calib, progress=False).report
    assert report["allocation"]["sensitivity"] == "sparsegpt"
    o = report["overall"]
    assert o["params_before"] - o["params_after"] == round(0.3 * o["params_before"])


def test_a_joint_grid_is_the_mean_and_steps_of_the_spread_either_side():
    from smartprune.compression.allocation import joint_grid

    cfg = build_recipe({"overall": {"target": 0.3, "spread": 0.1, "points": 2, "sensitivity": "joint"},
                        "sparsegpt": {}}, "x", "test").overall
    grid, base = joint_grid(0.5, cfg)
    assert grid == pytest.approx((0.4, 0.45, 0.5, 0.55, 0.6)) and base == 2
    grid, base = joint_grid(0.05, cfg)  # clipped at 0: one point below the mean
    assert grid == pytest.approx((0.0, 0.05, 0.1, 0.15)) and base == 1


def test_joint_curves_start_at_the_floor_and_are_made_convex():
    units = [Unit("a", ["a"], 100), Unit("b", ["b"], 100)]
    # relative to both at 0.5, per entry: a costs 0.1 from 40 to 50, then 0.05 (not convex: one segment of
    # 0.075 from 40 to 60); b costs 0.2, then 0.01 (one segment of 0.105)
    curves = {"a": [-1.0, 0.0, 0.5], "b": [-2.0, 0.0, 0.1]}
    # 100 entries, rates within 0.5 +- 0.1: 40 each, then the 20 left go to a's cheaper merged segment
    assert allocate(units, curves, (0.4, 0.5, 0.6), 100, spread=0.1, origin=False) == {"a": 60, "b": 40}
    # with the unpruned point (0, 0) implied, the gains below the mean would be read as free pruning
    assert allocate(units, curves, (0.4, 0.5, 0.6), 100, spread=0.1) == {"a": 50, "b": 50}


def test_joint_sensitivity_measures_divergence_around_the_mean_and_restores_the_model(calib):
    import torch

    from smartprune.adapters import get_adapter
    from smartprune.compression.allocation import HeldOutLoss, block_pruner, joint_sensitivity, units

    model = tiny_model("llama")
    adapter = get_adapter(model)
    assert HeldOutLoss(adapter, calib.eval_ids, divergence=True)() == pytest.approx(0.0, abs=1e-5)  # dense vs itself
    block_units = units(adapter, embedding=False, blocks=True)
    paths = [p for u in block_units for p in u.paths]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune = block_pruner(model, paths, calib.ids, "sparsegpt")
    curves = joint_sensitivity(adapter, block_units, calib.ids, calib.eval_ids, (0.2, 0.5, 0.8), 1, "frequency",
                               prune, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # dense again for the stages
    assert set(curves) == {u.name for u in block_units}
    assert all(c[1] == 0.0 for c in curves.values())  # the shared starting point
    # pruning one unit far more than the others costs, pruning it less gains, summed over the units
    assert sum(c[2] for c in curves.values()) > 0 > sum(c[0] for c in curves.values())


def test_the_divergence_is_float64_exact_on_a_large_vocabulary_with_large_logits():
    import torch

    from smartprune.compression.allocation import Divergence

    g = torch.Generator().manual_seed(0)
    dense = 12 * torch.randn(256, 49152, generator=g)  # SmolLM2's vocabulary, logits of +-40
    moved = dense + 0.05 * torch.randn(256, 49152, generator=g)
    exact = torch.nn.functional.kl_div(torch.log_softmax(moved.double(), -1), torch.log_softmax(dense.double(), -1),
                                       log_target=True, reduction="batchmean")
    # the differences an allocation compares are 1e-4 nats or less: its error must be far below that
    kl = Divergence(dense)
    assert abs(kl(moved) - float(exact)) < 2e-6 and abs(kl(dense)) < 2e-6


def test_the_held_out_divergence_is_the_kl_of_the_next_token_distributions_by_hand(calib):
    import torch
    import torch.nn.functional as F

    from smartprune.adapters import get_adapter
    from smartprune.compression.allocation import HeldOutLoss

    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = calib.eval_ids
    with torch.no_grad():
        dense = model(ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
        loss = HeldOutLoss(adapter, ids, divergence=True)
        w = adapter.ff_projections(1)["down"].weight
        saved = w.clone()
        w.mul_(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
        moved = model(ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
        expected = F.kl_div(F.log_softmax(moved, -1), F.log_softmax(dense, -1), log_target=True,
                            reduction="batchmean")
        assert loss(1) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
        # several versions of block 1 after it as one batch: each as if run alone
        first = adapter.run_block(1, loss.inputs[1])
        w.copy_(saved)
        second = adapter.run_block(1, loss.inputs[1])
        together = loss.after(1, [first, second])
        assert together[0] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
        assert together[1] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("embedding", [False, True])
def test_a_joint_allocation_meets_the_target_within_the_spread(embedding, calib):
    model = tiny_model("llama")
    emb = {"fpp_emb": {"criterion": "frequency", "steps": 0}} if embedding else {}
    recipe = build_recipe({"overall": {"target": 0.3, "sensitivity": "joint", "spread": 0.1, "points": 1},
                           **emb, "sparsegpt": {}}, "x", "test")
    report = compress(model, None, recipe, calib=calib, progress=False).report
    o, a = report["overall"], report["allocation"]
    assert o["params_before"] - o["params_after"] == round(0.3 * o["params_before"])
    assert a["sensitivity"] == "joint (sparsegpt)" and len(a["grid"]) == 3
    mean = a["grid"][1]
    assert all(mean - 0.1 - 1 / u["entries"] <= u["rate"] <= mean + 0.1 + 1 / u["entries"] for u in a["units"])
    assert all(u["loss_increase"][1] == 0.0 for u in a["units"])
    assert any(u["unit"] == "embedding" for u in a["units"]) == embedding


def test_the_quick_schedule_halves_a_joint_measurement_and_leaves_a_structured_plan_alone():
    from smartprune.runs.preflight import quick_schedule

    smart, said = quick_schedule(load_recipe("smart-50"))  # joint by default: two moves each side
    assert smart.overall.points == 1 and "joint measurement at the mean +- the spread only" in said
    slim, said = quick_schedule(load_recipe("slim-40"))  # its overall section plans structure, no moves
    assert slim.overall == load_recipe("slim-40").overall and "joint" not in said
