"""`soup cook --best`: every method that fits the ingredients cooked on one selection set, the one that
scores best there kept and written, with every candidate's selection score and the winner in its metadata.
The verdict on another split is the judge's (soup.judge.verdict), fed through `on_candidate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from soup.cook.batchnorm import DEFAULT_IMAGES, check_images
from soup.cook.cooking import check_ingredients, fitted, save_soup, selector
from soup.cook.sweeps import leave_out_pruned
from soup.cook.methods import METHODS, Kitchen, Soup
from soup.cook.registry import settle_options
from soup.errors import SoupError, one_line
from soup.models.checkpoint import Checkpoint
from soup.models.metadata import TEXT, declare_method_field
from soup.text import shown


declare_method_field("best", {"winner": TEXT}, ("winner",))  # the methods tried and the one kept


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
              on_candidate: Callable[[str, Soup], None] | None = None, bn_images: int | None = DEFAULT_IMAGES,
              named: list | None = None) -> Path:
    """Cook every candidate method with its defaults on one selector, keep the best on `select_on` (ties:
    the earlier method) and write it. A method that cannot run here (stock without a rebuildable start,
    one ingredient) is skipped with a one-line note. `on_candidate(method, soup)` sees every soup cooked.
    Pruned draws are left out as soup.cook.cooking.cook leaves them (`named`: the files the user named)."""
    console = console or Console()
    if select_on is None:
        raise SoupError("--best picks the winner on held-out data; drop --no-eval")
    check_images(bn_images)
    ingredients = leave_out_pruned(ingredients, named or [], console)
    check_ingredients(ingredients, out, False, data_root, force, console, overwrite)
    select = selector(ingredients, select_on, data_root, device, bn_images, console)
    scored, skipped, best = {}, {}, None
    for method in candidate_methods():
        console.print(f"[bold]{method} soup[/] of {len(ingredients)} ingredients, selected on {select_on}")
        try:
            kitchen = Kitchen(ingredients[0], settle_options(method, {}), reset=select.reset)
            soup = fitted(METHODS[method].fn(ingredients, select, console, kitchen), select, console)
        except SoupError as err:
            skipped[method] = one_line(err)
            console.print(f"  best: {method} skipped: {shown(skipped[method])}")
            continue
        scored[method] = select(soup.state_dict)["top1"]
        console.print(f"  best: {method} soup {scored[method]:.2%} on {select_on}")
        if on_candidate is not None:
            on_candidate(method, soup)
        if best is None or scored[method] > scored[best[0]]:
            best = (method, soup)  # only the leader's weights are kept: one model in memory, not one per method
    if best is None:
        raise SoupError("--best: no method could cook these ingredients (" +
                        "; ".join(f"{m}: {why}" for m, why in skipped.items()) + ")")
    winner, soup = best
    console.print(f"[bold]best[/]: {winner} wins on {select_on} with {scored[winner]:.2%} (" +
                  ", ".join(f"{m} {top1:.2%}" for m, top1 in scored.items()) + ")")
    soup.extra = {**soup.extra, "best": {"winner": winner, "candidates": scored, "skipped": skipped}}
    return save_soup("best", soup, ingredients, out, select, True, console, calibrate, overwrite=overwrite)
