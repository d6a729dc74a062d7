"""Recipe validation: every error names the key or value."""

import json

import pytest

from smartprune.errors import RecipeError
from smartprune.recipes import builtin_recipes, load_recipe
from smartprune.recipes.schema import build_recipe


def test_builtins_exist_and_paper_has_table_2_settings():
    recipes = builtin_recipes()
    assert {"paper", "paper-30", "irc", "dwc", "fpp-emb", "fpp-ff"} <= set(recipes)
    paper = recipes["paper"]
    assert list(paper.stages) == ["fpp_emb", "irc", "dwc", "fpp_ff"]
    assert paper.stages["irc"].variant == "qk" and paper.stages["irc"].rate == 1.0
    assert paper.stages["dwc"].variant == "both" and paper.stages["dwc"].rate == 1.0
    for key in ("fpp_emb", "fpp_ff"):
        s = paper.stages[key]
        assert (s.target_sparsity, s.p_pos, s.p_neg, s.max_it, s.lr) == (0.7, 0.05, 0.05, 100, 5e-5)
    assert all(r.description for r in recipes.values())


def test_a_single_stage_with_only_a_rate_is_a_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("irc: {rate: 1.0}\n")
    recipe = load_recipe(path)
    assert recipe.name == "mine" and list(recipe.stages) == ["irc"]
    (tmp_path / "r.json").write_text(json.dumps({"dwc": {"variant": "upper", "rate": 0.5}}))
    assert load_recipe(tmp_path / "r.json").stages["dwc"].variant == "upper"


@pytest.mark.parametrize("doc, message", [
    ({"irc": {"rate": 1.5}}, "irc.rate: 1.5 is outside [0, 1]"),
    ({"dwc": {"rate": -0.1}}, "dwc.rate: -0.1 is outside [0, 1]"),
    ({"irc": {"rat": 1.0}}, "unknown key 'rat' (did you mean 'rate'?)"),
    ({"ircc": {"rate": 1.0}}, "unknown key 'ircc' (did you mean 'irc'?)"),
    ({"fpp_ff": {"criterion": "magnitud"}}, "'magnitud' is not one of magnitude, literal"),
    ({"fpp_ff": {"max_it": 2.5}}, "fpp_ff.max_it: expected a whole number"),
    ({"irc": {"train_rest": "yes"}}, "irc.train_rest: expected true or false"),
    ({"strategy": {"recursive": True}}, "no stage given"),
    ({"irc": [1, 2]}, "irc: expected a mapping"),
    ([1, 2], "expected a mapping of stages"),
])
def test_bad_recipes_name_the_offending_key(doc, message):
    with pytest.raises(RecipeError) as err:
        build_recipe(doc, "x", "x.yaml")
    assert message in str(err.value)


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'papr' \\(did you mean 'paper'\\?\\)"):
        load_recipe("papr")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("irc: {rate: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
