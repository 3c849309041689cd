"""The `soup` command: parses arguments and calls the stage that owns the work."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from soup.errors import SoupError, interrupt_on_signals, one_line

console = Console(highlight=False)


class SoupGroup(click.Group):
    """Turns a user mistake into one line on stderr and exit code 2, never a traceback; Ctrl-C or SIGTERM
    into one line and exit code 130."""

    def invoke(self, ctx):
        try:
            with interrupt_on_signals():
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
    from soup.distributed import is_main
    from soup.recipe import load_recipe
    from soup.train import ingredient_table, select_ingredients, train_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    main = is_main()  # under torchrun, rank 0 alone prints
    if list_only:
        for item in select_ingredients(recipe, ingredient):
            settings = ", ".join(f"{k}={v}" for k, v in item.settings.items()) or "(no sweep)"
            if main:
                click.echo(f"{item.index}\t{item.id}\t{settings}")
        return
    results = train_recipe(recipe, out, ingredient, console, resume=resume, use_cache=not no_cache)
    if main:
        console.print(ingredient_table(recipe.name, results))


def _method_options(fn):
    """One flag per registered soup method (--uniform, --greedy, ...), so a new method needs no CLI code."""
    from soup.cook import METHODS

    for name in reversed(list(METHODS)):
        is_default = name == "uniform"
        summary = " ".join((METHODS[name].fn.__doc__ or "").split("\n\n")[0].split())
        # Only the default method's flag may carry a default: click lets the last one processed win.
        extra = {"default": True} if is_default else {}
        fn = click.option(f"--{name}", "method", flag_value=name, **extra,
                          help=(summary or f"Cook a {name} soup.") + (" The default." if is_default else ""))(fn)
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
@click.option("--no-eval", is_flag=True, help="Average without data (uniform, stock, interpolate with one alpha).")
@click.option("--force", is_flag=True, help="Allow ingredients with different starting weights.")
@click.option("--alpha", default=None, metavar="A|START:STOP:STEP",
              help="--interpolate: weight of B (0.5 by default), or a sweep such as 0:1:0.1 that keeps the best.")
@click.option("--per-layer", is_flag=True, help="--learned: one coefficient per ingredient and tensor.")
@click.option("--plot", "plot_path", is_flag=False, flag_value="soups.png", default=None, metavar="[PNG]",
              help="Also write a picture of ingredients, greedy path and soups (default: soups.png beside "
              "the soup).")
def cook(method, paths, output, data_root, select_on, no_eval, force, alpha, per_layer, plot_path):
    """Cook a soup of compatible checkpoints (default: every ingredient under checkpoints/).

    --interpolate takes B (interpolated from the starting weights) or A B as its checkpoints."""
    from soup.checkpoint import find_checkpoints
    from soup.cook import cook as cook_soup

    ingredients = find_checkpoints(list(paths) or ["checkpoints"], kinds={"ingredient"} if not paths else None)
    _report_sweeps(ingredients, list(paths) or [Path("checkpoints")])
    output = output or Path("checkpoints") / "soups" / f"{method}.safetensors"
    options = {k: v for k, v in (("alpha", alpha), ("per_layer", per_layer or None)) if v is not None}
    path = cook_soup(method, ingredients, output, None if no_eval else select_on, data_root, force, console,
                     options=options)
    if plot_path:
        from soup.plot import plot_checkpoints

        png = path.parent / plot_path if plot_path == "soups.png" else Path(plot_path)
        soups = [c for c in find_checkpoints([path.parent]) if c.kind != "ingredient"]
        plot_checkpoints([c for c in ingredients if c.kind == "ingredient"] + soups, png, select_on, data_root,
                         console)


def _report_sweeps(ingredients, paths) -> None:
    """After a sweep ran as separate jobs, say which ingredients are not finished; cook goes on with the
    rest. Only folders are surveyed: files named one by one are a deliberate choice."""
    from soup.sweeps import report, sweep_status

    folders = [Path(p) for p in paths if Path(p).is_dir()]
    if folders:
        report(sweep_status(ingredients, folders), console)


def _checkpoints(paths, kinds: set[str] | None = None):
    """The checkpoints named, or by default those under checkpoints/ (of `kinds` only, if given)."""
    from soup.checkpoint import find_checkpoints

    checkpoints = find_checkpoints(list(paths) or ["checkpoints"], kinds=None if paths else kinds)
    if not checkpoints:
        raise SoupError("no checkpoints found; train with `soup train RECIPE` or name checkpoint files")
    return checkpoints


@cli.command(name="eval")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: each checkpoint's recipe's data.root).")
@click.option("--split", type=click.Choice(["val", "holdout", "train"]), default="val", show_default=True)
@click.option("--ensemble", is_flag=True, help="Add the ensemble of the ingredients (of all checkpoints when "
              "fewer than two are ingredients): mean of logits, or of probabilities across architectures.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--no-cache", is_flag=True, help="Decode every image for every checkpoint (no soup.cache).")
def eval_command(paths, data_root, split, ensemble, as_json, no_cache):
    """Evaluate checkpoints side by side (default: everything under checkpoints/)."""
    from soup.evaluate import Evaluator, eval_rows, print_eval_table

    checkpoints = _checkpoints(paths)
    rows = eval_rows(checkpoints, Evaluator(split, data_root, use_cache=not no_cache), ensemble)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        print_eval_table(rows, split, console)


@cli.command(name="inspect")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--line", nargs=2, type=click.Path(path_type=Path), default=None, metavar="A B",
              help="Also measure held-out accuracy along the straight line from A to B (a dip: a loss barrier).")
@click.option("--points", default=5, show_default=True, help="Points on the --line, endpoints included.")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root for --line (default: the recipe's data.root).")
@click.option("--split", type=click.Choice(["val", "holdout"]), default="val", show_default=True,
              help="Held-out set for --line.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_command(paths, line, points, data_root, split, as_json):
    """Diagnose checkpoints before and after cooking: shared start, distances and cosines between their
    fine-tuning deltas, what each soup tried (default: every ingredient under checkpoints/)."""
    from soup.checkpoint import read_checkpoint
    from soup.diagnose import describe_soup, loss_line, pair_geometry, print_inspection

    checkpoints = _checkpoints(paths, kinds={"ingredient"})
    report = pair_geometry(checkpoints)
    if line:
        report["line"] = loss_line(read_checkpoint(line[0]), read_checkpoint(line[1]), points, split, data_root)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for checkpoint in checkpoints:
        if checkpoint.kind != "ingredient":
            describe_soup(checkpoint, console)
    print_inspection(report, console)


@cli.command(name="plot")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="soups.png",
              show_default=True)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: each checkpoint's recipe's data.root).")
@click.option("--split", type=click.Choice(["val", "holdout", "train"]), default="val", show_default=True)
def plot_command(output, paths, data_root, split):
    """Picture of held-out accuracy: ingredients (sorted), the greedy path, every soup, and the ensemble
    (default: everything under checkpoints/). Needs matplotlib: pip install 'soup[plot]'."""
    from soup.plot import plot_checkpoints

    checkpoints = _checkpoints(paths)
    plot_checkpoints(checkpoints, output, split, data_root, console)


@cli.command()
@click.argument("checkpoint_paths", metavar="CKPT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root holding test_images/mistery_category/ (default: the recipe's data.root).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="submission.csv",
              show_default=True)
@click.option("--ensemble", is_flag=True, help="Average several checkpoints (architectures may differ, classes "
              "may not); the members are listed in <output>.json.")
def submit(checkpoint_paths, data_root, output, ensemble):
    """Write Id,Category predictions for the test images."""
    from soup.checkpoint import read_checkpoint
    from soup.submit import predict_submission, write_provenance, write_submission

    checkpoints = [read_checkpoint(p) for p in checkpoint_paths]
    ids, categories, provenance = predict_submission(checkpoints, data_root, ensemble)
    write_submission(output, ids, categories)
    sidecar = write_provenance(output, provenance)
    what = f"the ensemble ({provenance['combined']}) of {len(checkpoints)} checkpoints" if ensemble else "1 checkpoint"
    console.print(f"wrote {output}: {len(ids)} predictions from {what}; provenance in {sidecar}")


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
