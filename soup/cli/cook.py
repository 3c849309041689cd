"""`soup cook`: one flag per registered method, then soup.cook does the work."""

from __future__ import annotations

from pathlib import Path

import click

from soup.cook import sweeps
from soup.cook.batchnorm import DEFAULT_IMAGES, check_images
from soup.cook.best import check_best_request, cook_best
from soup.cook.crossfit import DEFAULT_FOLDS
from soup.cook.cooking import cook as cook_soup
from soup.cook.methods import METHODS
from soup.cook.sweeps import sweep_status
from soup.data.outputs import check_output, data_roots
from soup.errors import SoupError
from soup.judge.plot import plot_checkpoints
from soup.judge.verdict import BestVerdict
from soup.models.checkpoint import find_checkpoints, read_checkpoint
from soup.cli import base
from soup.cli.base import cli, read_more, trust_hub_option, warn


def _method_options(fn):
    """One flag per registered soup method (--uniform, --greedy, ...), so a new method needs no CLI code."""
    for name in reversed(list(METHODS)):
        is_default = name == "uniform"
        summary = " ".join((METHODS[name].fn.__doc__ or "").split("\n\n")[0].split())
        # Only the default method's flag may carry a default: click lets the last one processed win.
        extra = {"default": True} if is_default else {}
        fn = click.option(f"--{name}", "method", flag_value=name, **extra,
                          help=(summary or f"Cook a {name} soup.") + (" The default." if is_default else ""))(fn)
    return fn


@cli.command(epilog=read_more("docs/cooking.md"))
@trust_hub_option
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
@click.option("--overwrite", is_flag=True, help="Replace an existing soup file (never an input or an ingredient).")
@click.option("--alpha", default=None, metavar="A|START:STOP:STEP",
              help="--interpolate: weight of B (0.5 by default), or a sweep such as 0:1:0.1 that keeps the best.")
@click.option("--per-layer", is_flag=True, help="--learned: one coefficient per ingredient and tensor.")
@click.option("--hyperplane", is_flag=True, help="--learned: coefficients summing to one, free in sign within "
              "--bound (MEHL-Soup), fitted a few at a time; fit with --select-on holdout.")
@click.option("--bound", type=float, default=None, metavar="B",
              help="--learned --hyperplane: each coefficient in [-B, 1+B] (default 0.5).")
@click.option("--patience", type=click.IntRange(min=1), default=None, metavar="N",
              help="--guided: stop after N candidates in a row are left out (3 by default).")
@click.option("--best", is_flag=True, help="Compare every method that fits on data none of them selected on "
              "(each half of the selection set chooses for the other), then cook the winner on all of it (default "
              "output checkpoints/soups/best.safetensors).")
@click.option("--folds", type=int, default=None, metavar="K",
              help="--best: cross-fit on K parts of the selection set, each scored by what the others chose "
              f"(default {DEFAULT_FOLDS}; 2: two halves).")
@click.option("--plot", "plot_path", is_flag=False, flag_value="soups.png", default=None, metavar="[PNG]",
              help="Also write a picture of ingredients, greedy path and soups (default: soups.png beside "
              "the soup).")
@click.option("--calibrate", is_flag=True, help="Also fit the soup's temperature on the selection set and "
              "store it in its metadata (see soup calibrate).")
@click.option("--bn-images", type=int, default=DEFAULT_IMAGES, show_default=True, metavar="N",
              help="Train images (a fixed, seeded subset) on which each mixed weight set's BatchNorm statistics "
              "are re-estimated before it is scored or written; models without BatchNorm skip it.")
@click.option("--no-bn-reset", is_flag=True, help="Keep the members' averaged BatchNorm statistics instead.")
def cook(method, paths, output, data_root, select_on, no_eval, force, overwrite, alpha, per_layer, hyperplane, bound,
         patience, best, folds, plot_path, calibrate, bn_images, no_bn_reset):
    """Cook a soup of compatible checkpoints (default: every ingredient under checkpoints/).

    --interpolate takes B (interpolated from the starting weights) or A B as its checkpoints."""
    found = find_checkpoints(list(paths) or ["checkpoints"], kinds={"ingredient"} if not paths else None, warn=warn)
    _report_sweeps(found, list(paths) or [Path("checkpoints")])
    ingredients = sweeps.leave_out_pruned(found, list(paths), base.console)
    bn_images = None if no_bn_reset else check_images(bn_images)
    options = {k: v for k, v in (("alpha", alpha), ("per_layer", per_layer or None), ("hyperplane", hyperplane or None),
                                 ("bound", bound), ("patience", patience)) if v is not None}
    if best:
        check_best_request(click.get_current_context().get_parameter_source("method")
                           is not click.core.ParameterSource.DEFAULT, options)
        method = "best"
    elif folds is not None:
        raise SoupError("--folds goes with --best (the parts its methods are compared on); add --best or drop --folds")
    output = output or Path("checkpoints") / "soups" / f"{method}.safetensors"
    png = (output.parent / plot_path if plot_path == "soups.png" else Path(plot_path)) if plot_path else None
    if png:  # a picture is redrawn freely, but never over a checkpoint: checked before cooking
        check_output(png, list(paths), overwrite=True, what="picture", roots=data_roots(ingredients, data_root))
    if best:
        verdict = BestVerdict()
        path = cook_best(ingredients, output, None if no_eval else select_on, data_root, force, base.console,
                         calibrate=calibrate, overwrite=overwrite, on_candidate=verdict, bn_images=bn_images,
                         k=DEFAULT_FOLDS if folds is None else folds)
        verdict.report(read_checkpoint(path).meta["best"]["winner"], base.console)
    else:
        path = cook_soup(method, ingredients, output, None if no_eval else select_on, data_root, force, base.console,
                         options=options, calibrate=calibrate, overwrite=overwrite, bn_images=bn_images)
    if png:
        soups = [c for c in find_checkpoints([path.parent], warn=warn) if c.kind != "ingredient"]
        plot_checkpoints([c for c in ingredients if c.kind == "ingredient"] + soups, png, select_on, data_root,
                         base.console)


def _report_sweeps(ingredients, paths) -> None:
    """After a sweep ran as separate jobs, say which ingredients are not finished; cook goes on with the
    rest. Only folders are surveyed: files named one by one are a deliberate choice."""
    folders = [Path(p) for p in paths if Path(p).is_dir()]
    if folders:
        sweeps.report(sweep_status(ingredients, folders), base.console)

