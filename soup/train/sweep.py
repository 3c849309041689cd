"""The sweep driver: train every ingredient of a recipe's sweep (or the one `--ingredient K` names), one
after another, each through soup.train.loop, under one process group when run by torchrun.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from soup.data.folders import class_list
from soup.errors import SoupError
from soup.models import distributed
from soup.models.inference import resolve_device
from soup.recipe.spec import Ingredient, Recipe, expand_sweep
from soup.train import logs
from soup.train.loop import train_ingredient


def select_ingredients(recipe: Recipe, index: int | None) -> list[Ingredient]:
    ingredients = expand_sweep(recipe)
    if index is None:
        return ingredients
    if not 0 <= index < len(ingredients):
        raise SoupError(f"--ingredient {index}: the recipe's sweep has {len(ingredients)} ingredients "
                        f"(0 to {len(ingredients) - 1})")
    return [ingredients[index]]


def train_recipe(recipe: Recipe, out: str | Path = "checkpoints", index: int | None = None,
                 console: Console | None = None, resume: bool = False,
                 use_cache: bool = True) -> list[tuple[Ingredient, Path]]:
    """Train every ingredient of a recipe's sweep (or just the `index`-th); returns their checkpoints."""
    console = console or Console()
    ingredients = select_ingredients(recipe, index)
    class_list(recipe.data.root)  # fail on a bad data folder before any model is built
    logs.notice(recipe.train.log, console)
    # Under torchrun one process group serves the whole sweep (nccl on CUDA, gloo on CPU); else a no-op.
    with distributed.session(resolve_device(ingredients[0].recipe.train.device)):
        return [(ingredient, train_ingredient(ingredient, out, console, resume, use_cache))
                for ingredient in ingredients]
