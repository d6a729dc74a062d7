"""Recipes: validated stage configurations, built-in or from a YAML/JSON file."""

from smartprune.recipes.loader import builtin_recipes, load_recipe
from smartprune.recipes.schema import (
    CalibrationConfig,
    DWCConfig,
    FitConfig,
    FPPConfig,
    IRCConfig,
    Recipe,
    StrategyConfig,
)

__all__ = [
    "CalibrationConfig", "DWCConfig", "FPPConfig", "FitConfig", "IRCConfig", "Recipe", "StrategyConfig",
    "builtin_recipes", "load_recipe",
]
