"""Recipes: validated stage configurations, built-in or from a YAML/JSON file.

The names below load on first use, so a torch-free part of the package (`recipes.sections`, read by the
command line's parser) can be imported without the schema and the methods behind it."""

__all__ = ["CalibrationConfig", "Recipe", "builtin_recipes", "load_recipe"]


def __getattr__(name: str):
    if name in ("builtin_recipes", "load_recipe"):
        from smartprune.recipes import resolve

        return getattr(resolve, name)
    if name in ("CalibrationConfig", "Recipe"):
        from smartprune.recipes import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'smartprune.recipes' has no attribute '{name}'")
