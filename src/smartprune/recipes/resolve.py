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


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not the last one silently kept."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise RecipeError(f"'{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _unique(pairs: list[tuple]) -> dict:
    """json.loads' object hook: a key given twice is an error, as in YAML."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise RecipeError(f"'{key}' is given twice")
        out[key] = value
    return out


def _parse(text: str, name: str, source: str, as_json: bool = False) -> Recipe:
    try:
        data = json.loads(text, object_pairs_hook=_unique) if as_json else yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"recipe {source}: not valid JSON at line {exc.lineno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {source}: not valid YAML/JSON{where}") from None
    except RecipeError as exc:
        raise RecipeError(f"recipe {source}: {exc}") from None
    except RecursionError:
        raise RecipeError(f"recipe {source}: nested too deeply to be a recipe") from None
    return build_recipe(data, name, source)


def load_recipe(spec: str | Path) -> Recipe:
    """A recipe from a built-in name (``paper``) or a path to a .yaml/.yml/.json file."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        if path.is_dir():
            raise RecipeError(f"recipe {path} is a folder, not a recipe file")
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        text = read_text(path, "recipe", RecipeError)
        return _parse(text, path.stem, str(path), as_json=path.suffix.lower() == ".json")
    recipes = builtin_recipes()
    if str(spec) not in recipes:
        raise RecipeError(f"unknown recipe '{spec}'{did_you_mean(str(spec), recipes)}; "
                          f"built-in: {', '.join(recipes)} (or give a .yaml file)")
    return recipes[str(spec)]
