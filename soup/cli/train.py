"""`soup train`: parses and calls soup.train."""

from __future__ import annotations

from pathlib import Path

import click

from soup.judge.report import ingredient_table
from soup.judge.study import below_start, print_below_start
from soup.models.checkpoint import find_checkpoints
from soup.models.distributed import is_main
from soup.models.families import data_defaults
from soup.models.runs import OUT_DIR
from soup.recipe.spec import read_recipe
from soup.text import printable
from soup.train.sweep import select_ingredients, train_recipe
from soup.cli import base
from soup.cli.base import cli, read_more, warn


@cli.command(epilog=read_more("docs/training.md"))
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.epochs=2 (repeatable).")
@click.option("--out", default=OUT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder for run output: <out>/<name>/<ingredient-id>/.")
@click.option("--ingredient", type=int, default=None, metavar="K",
              help="Train only the K-th sweep combination (for schedulers running them in parallel).")
@click.option("--list", "list_only", is_flag=True, help="List the sweep's ingredients and exit.")
@click.option("--resume", is_flag=True, help="Continue unfinished ingredients from their saved state; skip "
              "finished ones.")
@click.option("--no-cache", is_flag=True, help="Turn the fast data paths off (decode every image every epoch).")
def train(recipe_path, overrides, out, ingredient, list_only, resume, no_cache):
    """Fine-tune the ingredients of RECIPE (one per sweep combination)."""
    recipe, said = read_recipe(recipe_path, list(overrides), data_defaults)
    main = is_main()  # under torchrun, rank 0 alone prints
    if list_only:
        for item in select_ingredients(recipe, ingredient):
            settings = printable(", ".join(f"{k}={v}" for k, v in item.settings.items())) or "(no sweep)"
            if main:
                click.echo(f"{item.index}\t{item.id}\t{settings}")
        return
    results = train_recipe(recipe, out, ingredient, base.console, resume=resume, use_cache=not no_cache)
    if main:
        if said:  # after training: a bad --out or data folder stays one error line
            base.console.print(said, markup=False)
        base.console.print(ingredient_table(recipe.name, results))
        # The whole sweep so far, other processes' ingredients included: the reasons compare with it.
        sweep = find_checkpoints([Path(out) / recipe.name], kinds={"ingredient"}, warn=warn)
        print_below_start(below_start(sweep), sweep, base.console)

