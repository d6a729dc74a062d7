"""Finding and parsing recipes: a built-in name or a YAML/JSON file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

from smartprune.errors import RecipeError, did_you_mean
from smartprune.files import read_text
from smartprune.recipes.schema import Recipe, build_recipe


def _builtin_dir():
    return resources.files("smartprune.recipes") / "builtin"


def builtin_recipes() -> dict[str, Recipe]:
    """Every built-in recipe by name, in alphabetical order."""
    files = sorted((f for f in _builtin_dir().iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    return {f.name[:-5]: _parse(f.read_text(), f.name[:-5], f"'{f.name[:-5]}'") for f in files}


def _parse(text: str, name: str, source: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {source}: not valid YAML/JSON{where}") from None
    return build_recipe(data, name, source)


def load_recipe(spec: str | Path) -> Recipe:
    """A recipe from a built-in name (``paper``) or a path to a .yaml/.yml/.json file."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        text = read_text(path, "recipe", RecipeError)
        if path.suffix.lower() == ".json":
            try:
                return build_recipe(json.loads(text), path.stem, str(path))
            except json.JSONDecodeError as exc:
                raise RecipeError(f"recipe {path}: not valid JSON at line {exc.lineno}") from None
        return _parse(text, path.stem, str(path))
    recipes = builtin_recipes()
    if str(spec) not in recipes:
        raise RecipeError(f"unknown recipe '{spec}'{did_you_mean(str(spec), recipes)}; "
                          f"built-in: {', '.join(recipes)} (or give a .yaml file)")
    return recipes[str(spec)]
