"""Recipes: reading a YAML file safely (files), checking every key and value (checks), the typed
recipe and its expansion into ingredients by sweep and random search (spec, search).
Everything downstream starts from a `Recipe` or an `Ingredient`.
"""

from soup.recipe.spec import Ingredient, Recipe, expand_sweep, load_recipe, recipe_from_dict  # noqa: F401
