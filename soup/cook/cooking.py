"""Cooking: weight-space averages ("soups") of compatible ingredients (Wortsman et al., ICML 2022).

This module owns `soup cook`'s checks and its output: that the ingredients can be averaged at all (same
classes, backbone, tensor layout and start; finite weights), calling the chosen method of soup.cook.methods
(where the registry lives), scoring the soup on its selection split and writing it as a checkpoint with
its provenance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, save_checkpoint
from soup.models.metrics import scores
from soup.models.records import (BatchNormReset, Calibration, Member, MethodRecord, Record, Selection, Start,
                                 Versus)
from soup.score.calibrate import calibration_record, print_calibration
# Importing soup.cook.methods registers every method in METHODS.
from soup.cook.batchnorm import DEFAULT_IMAGES, check_images
from soup.cook.methods import METHODS, Kitchen, Soup
from soup.cook.registry import settle_options
from soup.cook.record import check_logs, record_soup
from soup.cook.selector import Selector
from soup.cook.sweeps import leave_out_pruned
from soup.data.outputs import check_output, data_roots
from soup.score.compare import versus_best
from soup.text import print_legend, shown

def first_difference(a: Checkpoint, b: Checkpoint) -> tuple[str, bool] | None:
    """The first reason `a` and `b` cannot be averaged, and whether --force may override it."""
    if a.classes != b.classes:
        if sorted(a.classes) == sorted(b.classes):
            return "same classes in a different order", False
        return f"different class lists ({len(a.classes)} vs {len(b.classes)} classes)", False
    if a.backbone != b.backbone:
        return f"different backbones ({a.backbone} vs {b.backbone})", False
    layout_a, layout_b = a.tensor_layout(), b.tensor_layout()
    if layout_a.keys() != layout_b.keys():
        only = sorted(layout_a.keys() ^ layout_b.keys())
        return f"different tensor names (e.g. {only[0]})", False
    for key in layout_a:
        if layout_a[key] != layout_b[key]:
            (sa, da), (sb, db) = layout_a[key], layout_b[key]
            what = "shape" if sa != sb else "dtype"
            return f"tensor {key} differs in {what} ({sa} {da} vs {sb} {db})", False
    if a.fingerprint != b.fingerprint and a.record.start.known and b.record.start.known:
        return (f"different starting weights (fingerprint {a.fingerprint} vs {b.fingerprint}); soups need a "
                "shared pretrained start"), True
    return None


def check_finite(ingredients: list[Checkpoint]) -> None:
    """A NaN or infinity in one ingredient would poison the whole average: refuse it by name before any
    work (the methods that read files themselves, soup.cook.weights and .learned, rely on this)."""
    for checkpoint in ingredients:
        checkpoint.check_finite()


def check_compatible(ingredients: list[Checkpoint], force: bool, console: Console) -> None:
    reference = ingredients[0]
    unknown = [c for c in ingredients if not c.record.start.known]
    if unknown:
        console.print(f"[yellow]note[/]: the shared-start check is off for {len(unknown)} ingredients imported "
                      f"without their start (e.g. {shown(unknown[0].name)}; soup import --start sets it)")
    for other in ingredients[1:]:
        difference = first_difference(reference, other)
        if difference is None:
            continue
        reason, forceable = difference
        if forceable and force:
            console.print(f"[yellow]warning[/]: {shown(other.path)} vs {shown(reference.path)}: {shown(reason)}; "
                          "averaging anyway (--force): expect a poor soup")
            continue
        hint = "; --force averages them anyway" if forceable else ""
        raise SoupError(f"cannot soup {reference.path} with {other.path}: {reason}{hint}")


def check_ingredients(ingredients: list[Checkpoint], out: str | Path, takes_soups: bool = False,
                      data_root: str | Path | None = None, force: bool = False, console: Console | None = None,
                      overwrite: bool = False) -> None:
    """Everything that must hold before any mixing: ingredients (not soups, unless the method takes them),
    each once, compatible and finite, and an output that may be written."""
    if not ingredients:
        raise SoupError("no ingredients to cook; train some with `soup train RECIPE` or name checkpoints")
    for checkpoint in ingredients:
        if checkpoint.kind != "ingredient" and not takes_soups:
            raise SoupError(f"{checkpoint.path} is a {checkpoint.kind} soup, not an ingredient; cook from "
                            "the ingredients themselves")
    if len({c.path.resolve() for c in ingredients}) != len(ingredients):
        raise SoupError("the same ingredient is listed twice; a soup counts each ingredient once")
    check_output(out, [c.path for c in ingredients], overwrite, "soup", checkpoint=True,
                 roots=data_roots(ingredients, data_root))
    check_compatible(ingredients, force, console or Console())
    check_finite(ingredients)
    check_logs(ingredients, console or Console())


def cook(method: str, ingredients: list[Checkpoint], out: str | Path, select_on: str | None = "val",
         data_root: str | Path | None = None, force: bool = False, console: Console | None = None,
         device: torch.device | None = None, options: dict | None = None, calibrate: bool = False,
         overwrite: bool = False, bn_images: int | None = DEFAULT_IMAGES, named: list | None = None) -> Path:
    """Cook one soup with `method` and write it as a normal checkpoint with its provenance. Draws a pruned
    search stopped at a rung are left out, said in one line, unless their file is among `named` (the
    paths the user gave: a file named is a deliberate choice). `options` are
    the method's own (e.g. alpha for interpolate, per_layer for learned); others are refused. `calibrate`
    fits the soup's temperature on the selection split and stores it in the metadata. `bn_images`: the
    train images every mixed weight set's BatchNorm statistics are re-estimated on (None: kept as
    mixed). An existing `out` is replaced only with `overwrite`, and never when it is an ingredient (see
    soup.data.outputs)."""
    console = console or Console()
    if method not in METHODS:
        raise SoupError(f"unknown soup method {method!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[method]
    options = settle_options(method, options or {})  # a bad option is one line before any ingredient is read
    check_images(bn_images)
    ingredients = leave_out_pruned(ingredients, named or [], console)
    check_ingredients(ingredients, out, spec.takes_soups, data_root, force, console, overwrite)
    if spec.needs_selection and select_on is None:
        without = " or ".join(f"--{m}" for m, s in METHODS.items() if not s.needs_selection)
        raise SoupError(f"the {method} soup needs held-out data; --no-eval works with {without} only")
    if calibrate and select_on is None:
        raise SoupError("--calibrate fits a temperature on held-out data; drop --no-eval")
    select = selector(ingredients, select_on, data_root, device, bn_images, console) if select_on else None
    console.print(f"[bold]{method} soup[/] of {len(ingredients)} ingredient{'s' if len(ingredients) != 1 else ''}" +
                  (f", selected on {select_on}" if select else ", without data"))
    print_legend([c.name for c in ingredients], console)  # the short ids the lines below name them by
    kitchen = Kitchen(ingredients[0], options, reset=select.reset if select else None)
    soup = fitted(spec.fn(ingredients, select, console, kitchen), select, console)
    # Whether held-out scores chose or fitted the weights (greedy, learned, an alpha sweep), making a
    # later score on this split optimistic; uniform and stock are only checked on it.
    chose = spec.needs_selection or len(soup.steps) > 1
    return save_soup(method, soup, ingredients, out, select, chose, console, calibrate,
                     holdout_verdict=spec.starts_from_best, data_root=data_root, overwrite=overwrite)


def selector(ingredients: list[Checkpoint], select_on: str, data_root: str | Path | None,
             device: torch.device | None, bn_images: int | None, console: Console) -> Selector:
    """The judge every weight set of a cook goes through, BatchNorm statistics re-estimated (bn_images)."""
    return Selector(ingredients[0], select_on, data_root, device, members=ingredients, bn_images=bn_images,
                    console=console)


def fitted(soup: Soup, select: Selector | None, console: Console) -> Soup:
    """The soup with the BatchNorm statistics its selection scored (a method returns mixed ones); without
    data, the mixed ones, said in one line where members differ in them."""
    if select is not None:
        soup.state_dict = select.prepare(soup.state_dict)
    elif len(soup.members) > 1 and any(key.endswith(".running_var") for key in soup.state_dict):
        console.print("  batchnorm: running statistics averaged, not re-estimated (--no-eval reads no data); "
                      "cook with data to fit them to the soup's weights")
    return soup


def batchnorm_record(select: Selector | None, state: dict[str, torch.Tensor]) -> BatchNormReset | None:
    """The record's bn_reset: which BatchNorm layers got statistics of their own, on which images; None
    for a model without BatchNorm, so such a soup's file is the same with or without the reset."""
    if select is None or not select.has_batchnorm:
        return None
    if select.reset is None:
        return BatchNormReset(off=True, layers=[])
    return BatchNormReset.parse(select.reset.record(state))


def save_soup(method: str, soup: Soup, ingredients: list[Checkpoint], out: str | Path, select: Selector | None,
              chose: bool, console: Console, calibrate: bool = False, holdout_verdict: bool = False,
              data_root: str | Path | None = None, overwrite: bool = False) -> Path:
    """Score `soup` on its selection split (when it has one) and write it with its provenance. With
    `holdout_verdict` and a holdout selection, it is also measured against its best ingredient on val.
    Without `overwrite`, a file that appeared at `out` since check_output looked (another cook racing to
    it) is left alone and this cook fails in one line."""
    selection, extra = None, {}
    if select is not None:
        logits, targets = select.logits(soup.state_dict)
        result = scores(logits, targets)
        selection = {"split": select.split, "root": select.root, "chose": chose, **result}
        if calibrate:
            extra["calibration"] = calibration_record(logits, targets, select.split)
            print_calibration(f"{method} soup", extra["calibration"], console)
        if holdout_verdict and select.split == "holdout":
            extra["versus_best"] = versus_best(soup.state_dict, soup.members[0][0], "val", data_root,
                                               select.device, console)
    reference = ingredients[0]
    record = Record(
        recipe=reference.recipe, backbone=reference.backbone, classes=reference.classes,
        start=Start(reference.fingerprint), kind=method, name=method,
        data_root=reference.record.data_root,  # where its data.root led
        method=MethodRecord([Member(c.name, str(c.path), w) for c, w in soup.members],
                            [c.name for c in ingredients], soup.steps, dict(soup.extra)),
        selection=Selection.parse(selection), bn_reset=batchnorm_record(select, soup.state_dict),
        calibration=Calibration.parse(extra.get("calibration")), versus_best=Versus.parse(extra.get("versus_best")))
    path = save_checkpoint(out, soup.state_dict, record, replace=overwrite)
    record_soup(path, record, ingredients, console)
    # One line: where the soup is, and what its selection set scored (optimistic: that set chose it).
    scored = (f": {selection['top1']:.2%} on {select.split} (the selection set), {len(soup.members)} of "
              f"{len(ingredients)} ingredients" if selection else "")
    console.print(f"  wrote {shown(path)}{scored}")
    return path
