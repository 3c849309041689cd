"""`soup eval`, `calibrate`, `inspect`, `plot` and `report`: parse and call soup.score and soup.judge."""

from __future__ import annotations

from pathlib import Path

import click

from soup.cook.diagnose import describe_soup, loss_line, pair_geometry, print_inspection
from soup.data.outputs import check_output, data_roots
from soup.errors import SoupError
from soup.judge.evaluate import evaluate_rows
from soup.judge.page import write_report
from soup.judge.plot import plot_checkpoints
from soup.judge.report import add_per_class, add_statistics, default_reference, print_eval_table, print_per_class, to_json
from soup.judge.study import flag_rows, print_below_start
from soup.models.checkpoint import read_checkpoint
from soup.models.views import parse_tta
from soup.score import stats
from soup.score.calibrate import calibrate_paths
from soup.score.evaluator import Evaluator
from soup.cli import base
from soup.cli.base import TTA_OPTION, cli, named_or_default, read_more, trust_hub_option


@cli.command(name="eval", epilog=read_more("docs/evaluating.md"))
@trust_hub_option
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
    checkpoints = named_or_default(paths)
    evaluated = evaluate_rows(checkpoints, Evaluator(split, data_root, use_cache=not no_cache), ensemble, tta)
    rows = add_statistics(evaluated, resamples, compare or default_reference([r for r, _ in evaluated]))
    best = add_per_class(evaluated, per_class) if per_class else None
    below = flag_rows(rows, checkpoints)
    if as_json:
        click.echo(to_json(rows))
        return
    print_eval_table(rows, split, base.console)
    if best:
        print_per_class(*best, base.console)
    print_below_start(below, checkpoints, base.console)


@cli.command(epilog=read_more("docs/evaluating.md"))
@click.argument("paths", metavar="CKPT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["val", "holdout"]), default=None,
              help="Split to fit on (default: the soup's selection split, else val).")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root (default: the checkpoint's recipe's data.root).")
def calibrate(paths, split, data_root):
    """Fit a temperature for each checkpoint (LBFGS on NLL) and store it in its metadata; the weights are
    untouched and top-1 never changes. soup eval and soup submit --ensemble use it."""
    calibrate_paths(paths, split, lambda chosen: Evaluator(chosen, data_root), base.console)


@cli.command(name="inspect", epilog=read_more("docs/cooking.md"))
@trust_hub_option
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
    checkpoints = named_or_default(paths, kinds={"ingredient"})
    report = pair_geometry(checkpoints)
    if line:
        report["line"] = loss_line(read_checkpoint(line[0]), read_checkpoint(line[1]), points, split, data_root)
    if as_json:
        click.echo(to_json(report))
        return
    for checkpoint in checkpoints:
        if checkpoint.kind != "ingredient":
            describe_soup(checkpoint, base.console)
    print_inspection(report, base.console)


@cli.command(name="plot", epilog=read_more("docs/evaluating.md"))
@trust_hub_option
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
    (default: everything under checkpoints/). Draws with matplotlib, which soup installs."""
    checkpoints = named_or_default(paths)
    if reliability_path == "reliability.png":
        reliability_path = Path(output).parent / reliability_path
    if reliability_path is not None and Path(reliability_path).resolve() == Path(output).resolve():
        raise SoupError(f"--reliability {reliability_path} is also the -o picture; name another file")
    for picture in filter(None, (output, reliability_path)):  # redrawn freely, never over a checkpoint
        check_output(picture, list(paths), overwrite=True, what="picture", roots=data_roots(checkpoints, data_root))
    plot_checkpoints(checkpoints, output, split, data_root, base.console, reliability_path)


@cli.command(name="report", epilog=read_more("docs/evaluating.md"))
@trust_hub_option
@click.argument("paths", metavar="[DIR]", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="report.html", show_default=True)
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None, help="Data root, as for soup eval.")
@click.option("--split", type=click.Choice(["val", "holdout", "train"]), default="val", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing page (never an input or a checkpoint).")
def report_command(paths, output, data_root, split, overwrite):
    """One self-contained HTML page for a whole study (default: everything under checkpoints/)."""
    write_report(named_or_default(paths), output, Evaluator(split, data_root), base.console, list(paths), overwrite)

