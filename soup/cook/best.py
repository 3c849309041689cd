"""`soup cook --best`: every method that fits the ingredients compared on data none of them selected on
(cross-fitting on two halves of the selection split, soup.cook.crossfit), the winner cooked on the whole
split and written, with every candidate's cross-fitted score, the halves and what each method chose on
each half in its metadata. The tables are the judge's (soup.judge.verdict), fed through `on_candidate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from soup.cook.batchnorm import DEFAULT_IMAGES, check_images
from soup.cook.cooking import check_ingredients, fitted, save_soup, selector
from soup.cook.crossfit import DEFAULT_FOLDS, Compared, cross_fitted, fold_selectors, folds, references, where
from soup.cook.methods import METHODS, Kitchen
from soup.cook.registry import settle_options
from soup.cook.sweeps import leave_out_pruned
from soup.errors import SoupError, one_line
from soup.models.checkpoint import Checkpoint
from soup.models.metadata import TEXT, declare_method_field
from soup.text import shown

MAX_FOLDS = 10  # each part costs one more cook of every method

declare_method_field("best", {"winner": TEXT}, ("winner",))  # the methods compared and the one kept


def check_best_request(method_given: bool, options: dict) -> None:
    """--best cooks every method itself, each with its defaults: a method flag or option would be ignored."""
    if method_given:
        raise SoupError("--best cooks every method itself; drop the method flag (e.g. --greedy)")
    if options:
        flag = "--" + next(iter(options)).replace("_", "-")
        raise SoupError(f"--best cooks each method with its defaults; drop {flag} (or cook that method alone)")


def candidate_methods() -> list[str]:
    """Every registered method that cooks from the ingredients alone, in registration order (which breaks
    ties: the simpler method first); interpolate mixes two given checkpoints, not the ingredients."""
    return [name for name, spec in METHODS.items() if not spec.takes_soups]


def cook_best(ingredients: list[Checkpoint], out: str | Path, select_on: str | None = "val",
              data_root: str | Path | None = None, force: bool = False, console: Console | None = None,
              device: torch.device | None = None, calibrate: bool = False, overwrite: bool = False,
              on_candidate: Callable[[Compared], None] | None = None, bn_images: int | None = DEFAULT_IMAGES,
              k: int = DEFAULT_FOLDS, named: list | None = None) -> Path:
    """Compare every candidate method with its defaults by cross-fitting on `k` parts of `select_on`
    (soup.cook.crossfit), then cook the winner (ties: the earlier method) on the whole of it and write it.
    A method that cannot run here (stock without a rebuildable start, one ingredient) is skipped with a
    one-line note. `on_candidate` sees every row of the comparison: each method's, then the ingredient the
    split picks and the ensemble, all on the same images. Pruned draws are left out as
    soup.cook.cooking.cook leaves them (`named`: the files the user named)."""
    console = console or Console()
    if select_on is None:
        raise SoupError("--best picks the winner on held-out data; drop --no-eval")
    if not 2 <= k <= MAX_FOLDS:
        raise SoupError(f"--folds {k}: expected 2 to {MAX_FOLDS} parts (each method cooks once per part)")
    check_images(bn_images)
    ingredients = leave_out_pruned(ingredients, named or [], console)
    check_ingredients(ingredients, out, False, data_root, force, console, overwrite)
    select = selector(ingredients, select_on, data_root, device, bn_images, console)
    ingredient_logits, targets = [], None
    for checkpoint in ingredients:
        logits, targets = select.logits(checkpoint.state_dict())
        ingredient_logits.append(logits)
    split = folds(targets, select_on, k)
    console.print(f"[bold]best[/]: comparing {len(candidate_methods())} methods on {where(split)}")
    rows, kitchens, skipped = compare(ingredients, select, split, targets, console)
    if not rows:
        raise SoupError("--best: no method could cook these ingredients (" +
                        "; ".join(f"{m}: {why}" for m, why in skipped.items()) + ")")
    for row in rows + references(ingredients, ingredient_logits, split, targets):
        if on_candidate is not None:
            on_candidate(row)
    scored = {row.name: row.top1 for row in rows}
    winner = max(scored, key=lambda m: scored[m])  # the first of equals: the earlier method
    console.print(f"[bold]best[/]: {winner} wins with {scored[winner]:.2%} on {select_on} cross-fitted (" +
                  ", ".join(f"{m} {top1:.2%}" for m, top1 in scored.items()) + f"); {winner} cooked on the whole "
                  f"of {select_on}:")
    soup = fitted(METHODS[winner].fn(ingredients, select, console, kitchens[winner]), select, console)
    soup.extra = {**soup.extra, "best": {"winner": winner, "candidates": scored, "skipped": skipped,
                                         "compared_on": split.record(),
                                         "folds": {row.name: row.folds for row in rows}}}
    return save_soup("best", soup, ingredients, out, select, True, console, calibrate, overwrite=overwrite)


def compare(ingredients: list[Checkpoint], select, split, targets: list[int],
            console: Console) -> tuple[list[Compared], dict[str, Kitchen], dict[str, str]]:
    """Every candidate method cross-fitted on the parts (their own steps unprinted): the rows, each
    method's kitchen (its starting weights, rebuilt once) and the methods skipped with why."""
    selectors, quiet = fold_selectors(select, split), Console(quiet=True)
    rows, kitchens, skipped = [], {}, {}
    for method in candidate_methods():
        kitchen = kitchens[method] = Kitchen(ingredients[0], settle_options(method, {}), reset=select.reset)

        def cook_on(chooser, method=method, kitchen=kitchen):
            return fitted(METHODS[method].fn(ingredients, chooser, quiet, kitchen), chooser, quiet)

        try:
            rows.append(cross_fitted(method, cook_on, split, selectors, targets, ingredients[0].classes, console))
        except SoupError as err:
            skipped[method] = one_line(err)
            console.print(f"  best: {method} skipped: {shown(skipped[method])}")
    return rows, kitchens, skipped
