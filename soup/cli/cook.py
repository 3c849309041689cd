"""`soup cook`: one flag per registered method and per option a method declares (soup.cook.registry), then
soup.cook does the work."""

from __future__ import annotations

from pathlib import Path

import click

from soup.cook import sweeps
from soup.cook.batchnorm import DEFAULT_IMAGES, check_images
from soup.cook.best import check_best_request, cook_best
from soup.cook.crossfit import DEFAULT_FOLDS
from soup.cook.cooking import cook as cook_soup
from soup.cook.methods import METHODS
from soup.cook.registry import Option, SoupMethod
from soup.cook.sweeps import sweep_status
from soup.data.outputs import check_output, data_roots
from soup.errors import SoupError
from soup.judge.plot import plot_checkpoints
from soup.judge.verdict import BestVerdict
from soup.models.checkpoint import find_checkpoints, read_checkpoint
from soup.models.runs import OUT_DIR, default_soup_file
from soup.cli import base
from soup.cli.base import cli, read_more, trust_hub_option, warn


class OptionValue(click.ParamType):
    """A method option's command-line value, read and checked by its declaration: a bad one is one line
    (a SoupError), as the same value given through the Python API is."""

    def __init__(self, option: Option):
        self.option, self.name = option, {int: "integer", float: "float", str: "text"}[option.type]

    def convert(self, value, param, ctx):
        return self.option.from_text(value)


def _method_flag(spec: SoupMethod) -> click.Option:
    # Only the default method's flag may carry a default: click lets the last one processed win.
    is_default = spec.name == "uniform"
    extra = {"default": True} if is_default else {}
    return click.Option([f"--{spec.name}", "method"], flag_value=spec.name, **extra,
                        help=(spec.summary or f"Cook a {spec.name} soup.") + (" The default." if is_default else ""))


def _option_flag(option: Option, owners: list[str]) -> click.Option:
    said = " or ".join(f"--{owner}" for owner in owners) + ": " + option.help
    if option.minimum is not None or option.maximum is not None:
        said = said.removesuffix(".") + f" ({option.expected()})."
    if option.type is bool:
        return click.Option([option.flag, option.name], is_flag=True, help=said)
    return click.Option([option.flag, option.name], type=OptionValue(option), default=option.default,
                        show_default=option.default is not None, metavar=option.metavar, help=said)


def registry_params() -> tuple[list[click.Option], list[click.Option]]:
    """One flag per registered method, and one per option the methods declare (an option several methods
    declare alike is one flag), read from the registry as it is now."""
    options: dict[str, tuple[Option, list[str]]] = {}
    for name, spec in METHODS.items():
        for option in spec.options.values():
            if not option.cli:
                continue
            first, owners = options.setdefault(option.name, (option, []))
            if (first.type, first.default) != (option.type, option.default):
                raise ValueError(f"soup methods {owners[0]} and {name} declare {option.flag} differently")
            owners.append(name)
    return ([_method_flag(spec) for spec in METHODS.values()],
            [_option_flag(option, owners) for option, owners in options.values()])


class MethodsCommand(click.Command):
    """`soup cook`: its own parameters, then the registry's method flags (after --trust-hub) and method
    options (before --best), read whenever it parses or prints help, so a method registered after import
    (a plugin, a test) is a flag like the rest. A flag a method would share with cook's own is refused."""

    _made: tuple = (None, [], [])

    def get_params(self, ctx):
        own = super().get_params(ctx)
        registry = tuple(METHODS.items())  # compared by value: a method registered again is rebuilt
        if self._made[0] != registry:
            self._made = (registry, *registry_params())
        _, methods, options = self._made
        flags = [opt for param in own + methods + options for opt in param.opts]
        clash = next((opt for i, opt in enumerate(flags) if opt in flags[:i]), None)
        if clash:  # the method author's mistake, said on first use rather than one flag silently hiding another
            raise ValueError(f"two of soup cook's flags (its own, a soup method's or an option's) are {clash}")
        at = next(i for i, param in enumerate(own) if param.name == "best")
        return own[:1] + methods + own[1:at] + options + own[at:]


@cli.command(cls=MethodsCommand, epilog=read_more("docs/cooking.md"))
@trust_hub_option
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
@click.option("--best", is_flag=True, help="Compare every method that fits on data none of them selected on "
              "(each part of the selection set is scored by soups the other parts chose), then cook the winner on all "
              "of it (default output checkpoints/soups/best.safetensors).")
@click.option("--folds", type=int, default=None, metavar="K",
              help="--best: cross-fit on K parts of the selection set, each scored by what the others chose "
              f"(default {DEFAULT_FOLDS}; 2: two halves).")
@click.option("--plot", "plot_path", is_flag=False, flag_value="soups.png", default=None, metavar="[PNG]",
              help="Also write a picture of ingredients, greedy path and soups (default: soups.png beside "
              "the soup).")
@click.option("--calibrate", is_flag=True, help="Also fit the soup's temperature on the selection set and "
              "store it in its metadata (see soup calibrate).")
@click.option("--bn-images", type=int, default=DEFAULT_IMAGES, show_default=True, metavar="N",
              help="Train images (at least 2; a fixed, seeded subset) on which each mixed weight set's BatchNorm statistics "
              "are re-estimated before it is scored or written; models without BatchNorm skip it.")
@click.option("--no-bn-reset", is_flag=True, help="Keep the members' averaged BatchNorm statistics instead.")
def cook(method, paths, output, data_root, select_on, no_eval, force, overwrite, best, folds, plot_path, calibrate,
         bn_images, no_bn_reset, **method_options):
    """Cook a soup of compatible checkpoints (default: every ingredient under checkpoints/).

    --interpolate takes B (interpolated from the starting weights) or A B as its checkpoints."""
    source = click.get_current_context().get_parameter_source
    for flag, on in (("--no-bn-reset", no_bn_reset), ("--no-eval", no_eval)):
        if on and source("bn_images") is not click.core.ParameterSource.DEFAULT:
            raise SoupError(f"--bn-images {bn_images} and {flag} contradict each other: {flag} measures no BatchNorm "
                            "statistics, on any number of images; drop one of them")
    bn_images = None if no_bn_reset else check_images(bn_images)
    found = find_checkpoints(list(paths) or [OUT_DIR], kinds={"ingredient"} if not paths else None, warn=warn)
    _report_sweeps(found, list(paths) or [Path(OUT_DIR)])
    given = {name for name in ("method", *method_options) if source(name) is not click.core.ParameterSource.DEFAULT}
    options = {name: value for name, value in method_options.items() if name in given}
    if best:
        check_best_request("method" in given, options)
        method = "best"
    elif folds is not None:
        raise SoupError("--folds goes with --best (the parts its methods are compared on); add --best or drop --folds")
    output = output or default_soup_file(method)
    png = (output.parent / plot_path if plot_path == "soups.png" else Path(plot_path)) if plot_path else None
    if png:  # a picture is redrawn freely, but never over a checkpoint: checked before cooking
        check_output(png, list(paths), overwrite=True, what="picture", roots=data_roots(found, data_root))
    if best:
        verdict = BestVerdict()
        path = cook_best(found, output, None if no_eval else select_on, data_root, force, base.console,
                         calibrate=calibrate, overwrite=overwrite, on_candidate=verdict, bn_images=bn_images,
                         k=DEFAULT_FOLDS if folds is None else folds, named=list(paths))
    else:
        path = cook_soup(method, found, output, None if no_eval else select_on, data_root, force, base.console,
                         options=options, calibrate=calibrate, overwrite=overwrite, bn_images=bn_images,
                         named=list(paths))
    if not (best or png):
        return
    record = read_checkpoint(path).record
    cooked = [c for c in found if c.name in (record.method.candidates or [])]  # cook() leaves pruned draws out
    if best:
        verdict.report(record.method.get("best")["winner"], base.console)
    if png:
        soups = [c for c in find_checkpoints([path.parent], warn=warn) if c.kind != "ingredient"]
        plot_checkpoints([c for c in cooked if c.kind == "ingredient"] + soups, png, select_on, data_root,
                         base.console)


def _report_sweeps(ingredients, paths) -> None:
    """After a sweep ran as separate jobs, say which ingredients are not finished; cook goes on with the
    rest. Only folders are surveyed: files named one by one are a deliberate choice."""
    folders = [Path(p) for p in paths if Path(p).is_dir()]
    if folders:
        sweeps.report(sweep_status(ingredients, folders), base.console)

