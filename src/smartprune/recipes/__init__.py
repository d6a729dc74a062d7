"""Recipes: validated stage configurations, built-in or from a YAML/JSON file."""

from smartprune.recipes.resolve import builtin_recipes, load_recipe
from smartprune.recipes.schema import CalibrationConfig, Recipe

__all__ = ["CalibrationConfig", "Recipe", "builtin_recipes", "load_recipe"]
