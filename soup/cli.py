"""The `soup` command: parses arguments and calls the stage that owns the work."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from soup.errors import SoupError, one_line

console = Console(highlight=False)


class SoupGroup(click.Group):
    """Turns a user mistake into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SoupError as err:
            click.echo(f"soup: error: {one_line(err)}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("soup: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=SoupGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soup")
def cli():
    """Fine-tune pretrained backbones several times and cook model soups from the results."""


@cli.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set train.epochs=2 (repeatable).")
@click.option("--out", default="checkpoints", show_default=True, type=click.Path(file_okay=False),
              help="Folder for run output: <out>/<name>/<ingredient-id>/.")
@click.option("--ingredient", type=int, default=None, metavar="K",
              help="Train only the K-th sweep combination (for schedulers running them in parallel).")
@click.option("--list", "list_only", is_flag=True, help="List the sweep's ingredients and exit.")
@click.option("--resume", is_flag=True, help="Continue unfinished ingredients from their saved state; skip "
              "finished ones.")
@click.option("--no-cache", is_flag=True, help="Turn the fast data paths off (decode every image every epoch).")
def train(recipe_path, overrides, out, ingredient, list_only, resume, no_cache):
    """Fine-tune the ingredients of RECIPE (one per sweep combination)."""
    from soup.recipe import load_recipe
    from soup.train import ingredient_table, select_ingredients, train_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    if list_only:
        for item in select_ingredients(recipe, ingredient):
            settings = ", ".join(f"{k}={v}" for k, v in item.settings.items()) or "(no sweep)"
            click.echo(f"{item.index}\t{item.id}\t{settings}")
        return
    results = train_recipe(recipe, out, ingredient, console, resume=resume, use_cache=not no_cache)
    console.print(ingredient_table(recipe.name, results))


def _method_options(fn):
    """One flag per registered soup method (--uniform, --greedy, ...), so a new method needs no CLI code."""
    from soup.cook import METHODS

    for name in reversed(list(METHODS)):
        is_default = name == "uniform"
        fn = click.option(f"--{name}", "method", flag_value=name, default=is_default,
                          help=f"Cook a {name} soup" + (" (default)." if is_default else "."))(fn)
    return fn


@cli.command()
@_method_options
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Soup file (default: checkpoints/soups/<method>.safetensors).")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: the ingredients' recipe's data.root).")
@click.option("--select-on", type=click.Choice(["val", "holdout"]), default="val", show_default=True,
              help="Held-out set that selects and checks the soup (holdout: the recipe's data.holdout slice).")
@click.option("--no-eval", is_flag=True, help="Average without data (uniform only).")
@click.option("--force", is_flag=True, help="Allow ingredients with different starting weights.")
def cook(method, paths, output, data_root, select_on, no_eval, force):
    """Cook a soup of compatible checkpoints (default: every ingredient under checkpoints/)."""
    from soup.checkpoint import find_checkpoints
    from soup.cook import cook as cook_soup

    ingredients = find_checkpoints(list(paths) or ["checkpoints"], kinds={"ingredient"} if not paths else None)
    output = output or Path("checkpoints") / "soups" / f"{method}.safetensors"
    cook_soup(method, ingredients, output, None if no_eval else select_on, data_root, force, console)


@cli.command(name="eval")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: each checkpoint's recipe's data.root).")
@click.option("--split", type=click.Choice(["val", "holdout", "train"]), default="val", show_default=True)
@click.option("--ensemble", is_flag=True, help="Add the logit ensemble of the ingredients.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def eval_command(paths, data_root, split, ensemble, as_json):
    """Evaluate checkpoints side by side (default: everything under checkpoints/)."""
    from soup.checkpoint import find_checkpoints
    from soup.evaluate import Evaluator, eval_rows, print_eval_table

    checkpoints = find_checkpoints(list(paths) or ["checkpoints"])
    if not checkpoints:
        raise SoupError("no checkpoints found; train with `soup train RECIPE` or name checkpoint files")
    rows = eval_rows(checkpoints, Evaluator(split, data_root), ensemble)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        print_eval_table(rows, split, console)


@cli.command()
@click.argument("checkpoint_path", metavar="CKPT", type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root holding test_images/mistery_category/ (default: the recipe's data.root).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="submission.csv",
              show_default=True)
def submit(checkpoint_path, data_root, output):
    """Write Id,Category predictions for the test images."""
    from soup.checkpoint import read_checkpoint
    from soup.submit import predict_test, write_submission

    ids, categories = predict_test(read_checkpoint(checkpoint_path), data_root)
    write_submission(output, ids, categories)
    console.print(f"wrote {output}: {len(ids)} predictions")


@cli.command()
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=8, show_default=True, help="Number of shape classes (at most 16).")
@click.option("--train-per-class", default=150, show_default=True)
@click.option("--val-per-class", default=25, show_default=True)
@click.option("--test-images", default=100, show_default=True)
@click.option("--image-size", default=64, show_default=True, help="Smallest page size in pixels.")
@click.option("--seed", default=0, show_default=True)
def sketches(root, classes, train_per_class, val_per_class, test_images, image_size, seed):
    """Generate a sketch data set in the course's folder layout under ROOT."""
    from soup.sketches import generate_sketches

    names = generate_sketches(root, classes, train_per_class, val_per_class, test_images, image_size, seed)
    console.print(f"wrote {len(names)} classes ({', '.join(names)}) to {root}")


@cli.command()
@click.option("--out", default="soup_demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--small", is_flag=True, hidden=True, help="A smaller, faster demo (for tests).")
def demo(out, small):
    """Everything on generated sketches, offline, on a CPU: pretrain, fine-tune, cook, eval, submit."""
    from soup.demo import run_demo

    run_demo(out, console, small=small)


def main():
    cli(prog_name="soup")
