"""The sweep driver: train every ingredient of a recipe's sweep (or the one `--ingredient K` names), one
after another, each through soup.train.loop, under one process group when run by torchrun.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from soup.data.folders import class_list
from soup.errors import SoupError
from soup.models import distributed
from soup.models.inference import resolve_device
from soup.models.checkpoint import find_checkpoints, read_checkpoint
from soup.models.runs import INGREDIENT_FILE, OUT_DIR, STATE_FILE, ingredient_dir
from soup.models.records import Record
from soup.recipe.spec import Ingredient, Recipe, expand_sweep, finished_wanted
from soup.train import logs
from soup.train.loop import train_ingredient


def select_ingredients(recipe: Recipe, index: int | None) -> list[Ingredient]:
    ingredients = expand_sweep(recipe)
    if index is None:
        return ingredients
    if not 0 <= index < len(ingredients):
        raise SoupError(f"--ingredient {index}: the recipe's sweep has {len(ingredients)} ingredients "
                        f"(0 to {len(ingredients) - 1})")
    return [ingredients[index]]


def train_recipe(recipe: Recipe, out: str | Path = OUT_DIR, index: int | None = None,
                 console: Console | None = None, resume: bool = False,
                 use_cache: bool = True) -> list[tuple[Ingredient, Path]]:
    """Train the ingredients of a recipe's sweep in order (or just the `index`-th); returns their checkpoints.
    A pruned search (search.prune) goes on drawing until search.trials have finished or search.max_trials
    were tried; so does `--ingredient K`, which trains nothing once the shared folder holds enough finished
    ones."""
    console = console or Console()
    ingredients = select_ingredients(recipe, index)
    class_list(recipe.data.root)  # fail on a bad data folder before any model is built
    logs.notice(recipe.train.log, console)
    wanted, pruning = finished_wanted(recipe), recipe.search is not None and recipe.search.prune is not None
    # Under torchrun one process group serves the whole sweep (nccl on CUDA, gloo on CPU); else a no-op.
    with distributed.session(resolve_device(ingredients[0].recipe.train.device)):
        if index is not None:
            main = distributed.world().main  # rank 0 looks at the shared folder and tells the others
            needed = distributed.from_main((not pruning or needed_draw(recipe, ingredients[0], out, wanted, console))
                                           if main else None)
            return [(ingredients[0], train_ingredient(ingredients[0], out, console, resume, use_cache))] if needed else []
        results = []
        for ingredient in ingredients:
            if sum(read_checkpoint(path).record.pruned is None for _, path in results) >= wanted:
                break
            results.append((ingredient, train_ingredient(ingredient, out, console, resume, use_cache)))
    if pruning and distributed.world().main:
        console.print(compute_line([read_checkpoint(path).record for _, path in results], wanted, len(ingredients)))
    return results


def needed_draw(recipe: Recipe, ingredient: Ingredient, out: str | Path, wanted: int, console: Console) -> bool:
    """Whether draw K of a pruned search still has to train: not when it never started and the shared folder
    already holds `wanted` finished ingredients of this sweep (other array tasks trained them)."""
    run_dir = ingredient_dir(out, recipe.name, ingredient.id)
    if (run_dir / INGREDIENT_FILE).exists() or (run_dir / STATE_FILE).exists():
        return True
    ids = {item.id for item in expand_sweep(recipe)}
    found = find_checkpoints([run_dir.parent], kinds={"ingredient"}) if run_dir.parent.is_dir() else []
    finished = sum(c.record.id in ids and c.record.pruned is None for c in found)
    if finished < wanted:
        return True
    console.print(f"[bold]{recipe.name}/{ingredient.id}[/]: not needed, {finished} draws of this search finished "
                  f"already (search.trials {recipe.search.trials}); nothing trained")
    return False


def compute_line(records: list[Record], wanted: int, drawn: int) -> str:
    """What the pruned search trained, against an unpruned sweep of as many finished ingredients."""
    finished = [r for r in records if r.pruned is None]
    pruned = [r for r in records if r.pruned is not None]
    trained = sum(len(r.history) for r in records)
    unpruned = sum(r.recipe["train"]["epochs"] for r in finished)
    saved = sum(r.recipe["train"]["epochs"] - len(r.history) for r in pruned)
    short = (f"; only {len(finished)} of the {wanted} wanted: every one of search.max_trials ({drawn}) was tried, "
             "raise it or narrow the space") if len(finished) < wanted else ""
    if not pruned and not short:  # nothing to weigh against an unpruned sweep: one short line
        return f"search: {len(finished)} finished, none pruned; {trained} epochs trained"
    ratio = f", {trained / unpruned:.2f}x the {unpruned}" if unpruned else ""
    # The start rule judges the final epoch too (soup.train.prune): such a draw trained to the end, saving nothing.
    at_end = sum(r.pruned.epoch == r.recipe["train"]["epochs"] for r in pruned)
    end = f"; {at_end} of them ended below the start at their final epoch" if at_end else ""
    return (f"search: {len(finished)} finished, {len(pruned)} pruned of {len(records)} draws tried{short}; "
            f"compute: {trained} epochs trained{ratio} that {len(finished)} finished draws take unpruned; stopping "
            f"the {len(pruned)} pruned draws at their rung saved {saved} epochs{end}")
