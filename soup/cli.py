"""The `soup` command: parses arguments and calls the stage that owns the work.

Every stage is imported at the top: the flags of `soup cook` come from the method registry, so loading the
CLI loads torch anyway. The console script (soup.__main__) installs its signal handlers before importing
this module, so a Ctrl-C during those seconds is still one line."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.console import Console

from soup.cook import sweeps
from soup.cook.best import check_best_request, cook_best
from soup.cook.cooking import cook as cook_soup
from soup.cook.diagnose import describe_soup, loss_line, pair_geometry, print_inspection
from soup.cook.methods import METHODS
from soup.cook.sweeps import sweep_status
from soup.data.outputs import check_output, data_roots
from soup.data.sketches import generate_sketches
from soup.demo import run_demo
from soup.errors import SoupError, interrupt_on_signals, one_line
from soup.judge.evaluate import evaluate_rows
from soup.judge.export import export_checkpoint, push_folder
from soup.judge.page import write_report
from soup.judge.plot import plot_checkpoints
from soup.judge.report import (add_per_class, add_statistics, default_reference, ingredient_table, print_eval_table,
                               print_per_class, to_json)
from soup.judge.study import below_start, flag_rows, print_below_start
from soup.judge.submit import check_submission_output, predict_submission, write_provenance, write_submission
from soup.judge.verdict import BestVerdict
from soup.models.backbones import trusting_hubs
from soup.models.checkpoint import find_checkpoints, read_checkpoint
from soup.models.distributed import is_main
from soup.models.views import parse_tta
from soup.recipe.spec import load_recipe
from soup.score import stats
from soup.score.calibrate import calibrate_paths
from soup.score.evaluator import Evaluator
from soup.text import printable, shown
from soup.train.loop import select_ingredients, train_recipe

console = Console(highlight=False)


def read_more(page: str) -> str:
    """The line that ends a command's --help: the page that documents it."""
    return f"Read more: {page} in soup's source tree."


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


@cli.command(epilog=read_more("docs/training.md"))
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
    recipe = load_recipe(recipe_path, list(overrides))
    main = is_main()  # under torchrun, rank 0 alone prints
    if list_only:
        for item in select_ingredients(recipe, ingredient):
            settings = printable(", ".join(f"{k}={v}" for k, v in item.settings.items())) or "(no sweep)"
            if main:
                click.echo(f"{item.index}\t{item.id}\t{settings}")
        return
    results = train_recipe(recipe, out, ingredient, console, resume=resume, use_cache=not no_cache)
    if main:
        console.print(ingredient_table(recipe.name, results))
        # The whole sweep so far, other processes' ingredients included: the reasons compare with it.
        sweep = find_checkpoints([Path(out) / recipe.name], kinds={"ingredient"}, warn=_warn)
        print_below_start(below_start(sweep), sweep, console)


def _trust_hub_option(fn):
    """--trust-hub: the only way a checkpoint's recorded torch.hub backbone may run its code (besides a copy
    torch.hub already cached), since a checkpoint may come from anyone."""

    @click.option("--trust-hub", "trust_hub", multiple=True, metavar="DIR|OWNER/REPO",
                  help="Run the torch.hub code of this folder or GitHub repo when a checkpoint names it as its "
                  "backbone (repeatable); without it, only timm models and the torch.hub cache's copies.")
    @functools.wraps(fn)
    def command(*args, trust_hub=(), **kwargs):
        with trusting_hubs(trust_hub):
            return fn(*args, **kwargs)
    return command


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
@_trust_hub_option
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
@click.option("--best", is_flag=True, help="Cook every method that fits, keep the best on the selection set "
              "(default output checkpoints/soups/best.safetensors) and compare them all on val.")
@click.option("--plot", "plot_path", is_flag=False, flag_value="soups.png", default=None, metavar="[PNG]",
              help="Also write a picture of ingredients, greedy path and soups (default: soups.png beside "
              "the soup).")
@click.option("--calibrate", is_flag=True, help="Also fit the soup's temperature on the selection set and "
              "store it in its metadata (see soup calibrate).")
def cook(method, paths, output, data_root, select_on, no_eval, force, overwrite, alpha, per_layer, hyperplane, bound,
         patience, best, plot_path, calibrate):
    """Cook a soup of compatible checkpoints (default: every ingredient under checkpoints/).

    --interpolate takes B (interpolated from the starting weights) or A B as its checkpoints."""
    ingredients = find_checkpoints(list(paths) or ["checkpoints"], kinds={"ingredient"} if not paths else None,
                                   warn=_warn)
    _report_sweeps(ingredients, list(paths) or [Path("checkpoints")])
    options = {k: v for k, v in (("alpha", alpha), ("per_layer", per_layer or None), ("hyperplane", hyperplane or None),
                                 ("bound", bound), ("patience", patience)) if v is not None}
    if best:
        check_best_request(click.get_current_context().get_parameter_source("method")
                           is not click.core.ParameterSource.DEFAULT, options)
        method = "best"
    output = output or Path("checkpoints") / "soups" / f"{method}.safetensors"
    png = (output.parent / plot_path if plot_path == "soups.png" else Path(plot_path)) if plot_path else None
    if png:  # a picture is redrawn freely, but never over a checkpoint: checked before cooking
        check_output(png, list(paths), overwrite=True, what="picture", roots=data_roots(ingredients, data_root))
    if best:
        verdict = BestVerdict(ingredients, data_root)
        path = cook_best(ingredients, output, None if no_eval else select_on, data_root, force, console,
                         calibrate=calibrate, overwrite=overwrite, on_candidate=verdict)
        verdict.report(read_checkpoint(path).meta["best"]["winner"], select_on, console)
    else:
        path = cook_soup(method, ingredients, output, None if no_eval else select_on, data_root, force, console,
                         options=options, calibrate=calibrate, overwrite=overwrite)
    if png:
        soups = [c for c in find_checkpoints([path.parent], warn=_warn) if c.kind != "ingredient"]
        plot_checkpoints([c for c in ingredients if c.kind == "ingredient"] + soups, png, select_on, data_root,
                         console)


def _warn(message: str) -> None:
    console.print(f"[yellow]warning[/]: {shown(message)}")


def _report_sweeps(ingredients, paths) -> None:
    """After a sweep ran as separate jobs, say which ingredients are not finished; cook goes on with the
    rest. Only folders are surveyed: files named one by one are a deliberate choice."""
    folders = [Path(p) for p in paths if Path(p).is_dir()]
    if folders:
        sweeps.report(sweep_status(ingredients, folders), console)


def _checkpoints(paths, kinds: set[str] | None = None):
    """The checkpoints named, or by default those under checkpoints/ (of `kinds` only, if given)."""
    checkpoints = find_checkpoints(list(paths) or ["checkpoints"], kinds=None if paths else kinds, warn=_warn)
    if not checkpoints:
        raise SoupError("no checkpoints found; train with `soup train RECIPE` or name checkpoint files")
    return checkpoints


TTA_OPTION = click.option(
    "--tta", default=None, metavar="flip|flip,crops",
    help="Test-time augmentation: average the logits over the image and its mirror (flip), plus 4 corner and "
    "1 centre crops of 87.5% of the side resized back (flip,crops).")


@cli.command(name="eval", epilog=read_more("docs/evaluating.md"))
@_trust_hub_option
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: each checkpoint's recipe's data.root).")
@click.option("--split", type=click.Choice(["val", "holdout", "train"]), default="val", show_default=True)
@click.option("--ensemble", is_flag=True, help="Add the ensemble of the ingredients (of all checkpoints when "
              "fewer than two are ingredients): mean of logits, or of probabilities across architectures.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (with intervals, comparisons "
              "and --per-class).")
@click.option("--no-cache", is_flag=True, help="Decode every image for every checkpoint (no soup.fast caches).")
@click.option("--bootstrap", "resamples", type=click.IntRange(min=0), default=stats.RESAMPLES, show_default=True,
              metavar="N", help=f"Bootstrap resamples over images for the 95% intervals (0: no intervals; at most "
              f"{stats.MAX_RESAMPLES:,}).")
@click.option("--compare", "compare", default=None, metavar="REF",
              help="Show each row's difference to REF (a row's name, or best: the best ingredient on the "
              "split; the default when soups are present) with a paired interval and McNemar p.")
@click.option("--per-class", "per_class", type=click.IntRange(min=1), default=None, metavar="K",
              help="Also show the best row's K worst classes and K most confused class pairs.")
@TTA_OPTION
def eval_command(paths, data_root, split, ensemble, as_json, no_cache, resamples, compare, per_class, tta):
    """Evaluate checkpoints side by side (default: everything under checkpoints/)."""
    tta = parse_tta(tta)
    stats.check_resamples(resamples)
    checkpoints = _checkpoints(paths)
    evaluated = evaluate_rows(checkpoints, Evaluator(split, data_root, use_cache=not no_cache), ensemble, tta)
    rows = add_statistics(evaluated, resamples, compare or default_reference([r for r, _ in evaluated]))
    best = add_per_class(evaluated, per_class) if per_class else None
    below = flag_rows(rows, checkpoints)
    if as_json:
        click.echo(to_json(rows))
        return
    print_eval_table(rows, split, console)
    if best:
        print_per_class(*best, console)
    print_below_start(below, checkpoints, console)


@cli.command(epilog=read_more("docs/evaluating.md"))
@click.argument("paths", metavar="CKPT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["val", "holdout"]), default=None,
              help="Split to fit on (default: the soup's selection split, else val).")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: the checkpoint's recipe's data.root).")
def calibrate(paths, split, data_root):
    """Fit a temperature for each checkpoint (LBFGS on NLL) and store it in its metadata; the weights are
    untouched and top-1 never changes. soup eval and soup submit --ensemble use it."""
    calibrate_paths(paths, split, lambda chosen: Evaluator(chosen, data_root), console)


@cli.command(name="inspect", epilog=read_more("docs/cooking.md"))
@_trust_hub_option
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
    checkpoints = _checkpoints(paths, kinds={"ingredient"})
    report = pair_geometry(checkpoints)
    if line:
        report["line"] = loss_line(read_checkpoint(line[0]), read_checkpoint(line[1]), points, split, data_root)
    if as_json:
        click.echo(to_json(report))
        return
    for checkpoint in checkpoints:
        if checkpoint.kind != "ingredient":
            describe_soup(checkpoint, console)
    print_inspection(report, console)


@cli.command(name="plot", epilog=read_more("docs/evaluating.md"))
@_trust_hub_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="soups.png",
              show_default=True)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: each checkpoint's recipe's data.root).")
@click.option("--split", type=click.Choice(["val", "holdout", "train"]), default="val", show_default=True)
@click.option("--reliability", "reliability_path", is_flag=False, flag_value="reliability.png", default=None,
              metavar="[PNG]", help="Also draw a reliability diagram, one line per row (default: "
              "reliability.png beside the picture).")
def plot_command(output, paths, data_root, split, reliability_path):
    """Picture of held-out accuracy: ingredients (sorted), the greedy path, every soup, and the ensemble
    (default: everything under checkpoints/). Needs matplotlib: pip install 'soup[plot]'."""
    checkpoints = _checkpoints(paths)
    if reliability_path == "reliability.png":
        reliability_path = Path(output).parent / reliability_path
    if reliability_path is not None and Path(reliability_path).resolve() == Path(output).resolve():
        raise SoupError(f"--reliability {reliability_path} is also the -o picture; name another file")
    for picture in filter(None, (output, reliability_path)):  # redrawn freely, never over a checkpoint
        check_output(picture, list(paths), overwrite=True, what="picture", roots=data_roots(checkpoints, data_root))
    plot_checkpoints(checkpoints, output, split, data_root, console, reliability_path)


@cli.command(name="report", epilog=read_more("docs/evaluating.md"))
@_trust_hub_option
@click.argument("paths", metavar="[DIR]", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="report.html", show_default=True)
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None, help="Data root, as for soup eval.")
@click.option("--split", type=click.Choice(["val", "holdout", "train"]), default="val", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing page (never an input or a checkpoint).")
def report_command(paths, output, data_root, split, overwrite):
    """One self-contained HTML page for a whole study (default: everything under checkpoints/)."""
    write_report(_checkpoints(paths), output, Evaluator(split, data_root), console, list(paths), overwrite)


@cli.command(epilog=read_more("docs/shipping.md"))
@_trust_hub_option
@click.argument("checkpoint_paths", metavar="CKPT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root holding test_images/mistery_category/ (default: the recipe's data.root).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="submission.csv",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing submission (never a checkpoint).")
@click.option("--ensemble", is_flag=True, help="Average several checkpoints (architectures may differ, classes "
              "may not); the members are listed in <output>.json.")
@TTA_OPTION
def submit(checkpoint_paths, data_root, output, overwrite, ensemble, tta):
    """Write Id,Category predictions for the test images."""
    tta = parse_tta(tta)
    checkpoints = [read_checkpoint(p) for p in checkpoint_paths]
    check_submission_output(output, checkpoints, overwrite, data_root)
    ids, categories, provenance = predict_submission(checkpoints, data_root, ensemble, tta)
    write_submission(output, ids, categories)
    sidecar = write_provenance(output, provenance)
    what = f"the ensemble ({provenance['combined']}) of {len(checkpoints)} checkpoints" if ensemble else "1 checkpoint"
    console.print(f"wrote {shown(output)}: {len(ids)} predictions from {what}; provenance in {shown(sidecar)}")


@cli.command(name="export", epilog=read_more("docs/shipping.md"))
@_trust_hub_option
@click.argument("checkpoint_path", metavar="CKPT", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace the export's files in a non-empty DIR (nothing else "
              "in it; never an ingredient's folder or the data root).")
@click.option("--push", "repo_id", default=None, metavar="OWNER/NAME",
              help="Then upload DIR to this Hugging Face Hub model repo (needs pip install 'soup[hub]').")
def export_command(checkpoint_path, folder, overwrite, repo_id):
    """Write CKPT as timm ships models: DIR/model.safetensors (timm's key names), config.json and a model
    card README.md; loads with timm.create_model("local-dir:DIR", pretrained=True)."""
    checkpoint = read_checkpoint(checkpoint_path)
    export = export_checkpoint(checkpoint, folder, overwrite, repo_id)
    console.print(f"wrote {shown(folder)}: {export.architecture} with {len(checkpoint.classes)} classes "
                  "(model.safetensors, config.json, README.md); checked against the checkpoint's own logits")
    if repo_id:
        console.print(f"pushed to {push_folder(folder, repo_id)}")


@cli.command(epilog=read_more("docs/recipes.md"))
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=8, show_default=True, help="Number of shape classes (at most 16).")
@click.option("--train-per-class", default=150, show_default=True)
@click.option("--val-per-class", default=25, show_default=True)
@click.option("--test-images", default=100, show_default=True)
@click.option("--image-size", default=64, show_default=True, help="Smallest page size in pixels.")
@click.option("--seed", default=0, show_default=True)
def sketches(root, classes, train_per_class, val_per_class, test_images, image_size, seed):
    """Generate a sketch data set in the course's folder layout under ROOT."""
    names = generate_sketches(root, classes, train_per_class, val_per_class, test_images, image_size, seed)
    console.print(f"wrote {len(names)} classes ({', '.join(names)}) to {root}")


@cli.command(epilog=read_more("README.md"))
@click.option("--out", default="soup_demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--small", is_flag=True, hidden=True, help="A smaller, faster demo (for tests).")
def demo(out, small):
    """Everything on generated sketches, offline, on a CPU: pretrain, fine-tune, cook, eval, submit."""
    run_demo(out, console, small=small)


def main():
    cli(prog_name="soup")
