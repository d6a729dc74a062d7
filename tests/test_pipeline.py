"""The run pipeline's specification and pre-flight (runs/spec.py, runs/preflight.py), and the CLI flags
drawn from the config dataclasses (cli/shared.config_flags)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from smartprune.recipes.schema import RECOVERY_BUDGETS, RecoverConfig
from smartprune.runs.preflight import QUICK_CALIBRATION, resolve_recipe, resolve_recovery
from smartprune.runs.spec import RunSpec


def test_a_specification_routes_each_keyword_to_its_group():
    spec = RunSpec.of("m", "paper", evaluate=True, out="o", json_path="r.json", device="cpu", calib_samples=4,
                      recover_steps=3, recover_budget="quick", limit=2, seed=5, quick=True)
    assert spec.outputs.out == Path("o") and spec.outputs.json_path == Path("r.json")
    assert spec.compute.device == "cpu" and spec.overrides.calib_samples == 4 and spec.overrides.quick
    assert (spec.recovery.steps, spec.recovery.budget) == (3, "quick") and spec.evaluation.limit == 2
    assert spec.seed == 5 and spec.measure is False
    assert RunSpec.of("m", "paper").evaluation is None  # compress: no perplexity phases
    with pytest.raises(TypeError, match="calib_windows"):  # a misspelt keyword fails as for any function
        RunSpec.of("m", "paper", calib_windows=4)


def test_the_preflight_resolves_the_quick_schedule_and_the_recovery():
    quick = RunSpec.of("m", "paper", quick=True, recover_budget="quick")
    recipe, schedule = resolve_recipe(quick)
    assert (recipe.calibration.samples, recipe.calibration.seqlen) == tuple(QUICK_CALIBRATION.values())
    assert recipe.strategy.step == 0.25 and "recursive rate steps of 0.25" in schedule
    assert resolve_recovery(quick, recipe) == RecoverConfig(**RECOVERY_BUDGETS["quick"])
    assert resolve_recovery(RunSpec.of("m", "paper", recover_budget="quick", recover_steps=0), recipe) is None
    replaced = resolve_recovery(RunSpec.of("m", "paper", recover_budget="full", recover_steps=5,
                                           recover_objective="blockwise"), recipe)
    assert (replaced.steps, replaced.objective, replaced.seqlen) == (5, "blockwise", RECOVERY_BUDGETS["full"]["seqlen"])
    assert resolve_recovery(RunSpec.of("m", "paper"), recipe) is None  # compress: only a recipe's own section
    assert resolve_recipe(RunSpec.of("m", "paper"))[1] == ""


def test_recover_flags_are_drawn_from_the_recover_section():
    """Each generated flag says what the recipe key says, offers its choices, and leaves the default to the
    schema (not given: None), so a changed default or doc reaches --help with no second copy."""
    from smartprune.cli.compression import RECOVER_FLAGS
    from smartprune.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["recover"]
    actions = {a.dest: a for a in sub._actions}
    fields = {f.name: f for f in dataclasses.fields(RecoverConfig)}
    for name in RECOVER_FLAGS:
        action, f = actions[name], fields[name]
        assert action.option_strings == ["--" + name.replace("_", "-")] and action.default is None
        assert action.help.startswith(f.metadata["doc"]) and action.choices == f.metadata["choices"]
        if f.default is None:  # its doc says what not giving it means (lr_after_fits: "default: lr")
            assert "(default: None)" not in action.help and "default:" in f.metadata["doc"]
        else:
            assert f"(default: {f.default:g})" in action.help if isinstance(f.default, float) else \
                f"(default: {f.default})" in action.help
    args = sub.parse_args(["c", "--teacher", "t", "--out", "o", "--lr", "0.5", "--objective", "blockwise"])
    assert (args.lr, args.objective, args.batch_size) == (0.5, "blockwise", None)
