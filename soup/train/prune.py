"""Pruning a search (`search.prune`): at each rung epoch, after that epoch's val pass, a draw stops when its
val top-1 is below its probed start's (`start`) or below the median of its peers' at that rung (`median`,
once at least MIN_PEERS other draws reached it), and the sweep driver (soup.train.sweep) draws the next one.
Under the `start` rule the final epoch is judged too: a draw that ends below its start counts as pruned (its
decision recorded as at a rung, with the final epoch) and is replaced, so every finished draw is at or above it.

Every decision is a file, `<out>/<name>/rungs/epoch-<E>/<id>.json`, written atomically once (val top-1,
threshold, rule, pruned or not) before the epoch's state is saved. The `median` rule reads its peers' files
there, so parallel `soup train --ingredient K` processes and Slurm array tasks on one shared folder see each
other's rungs without any lock; a draw that reaches a rung it has a file for (a rerun, or a resume after a
kill between the file and the state) takes the recorded decision, never a new one, so the peers that came
later cannot change it. The decision also travels in the epoch's record (`rung`), so the state, the
checkpoint and metrics.json (`pruned`) carry it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
from pathlib import Path
from typing import Callable

from soup.errors import SoupError
from soup.models import distributed
from soup.models.checkpoint import read_checkpoint
from soup.models.files import write_text_atomic
from soup.models.runs import INGREDIENT_FILE, rung_file, rung_folder
from soup.models.records import Rung, first_pruned
from soup.recipe.spec import Ingredient, resumable
from soup.text import shown

MIN_PEERS = 3  # the median of fewer draws is too noisy to stop one on


def _read(path: Path) -> dict | None:
    """A rung file's content, or None when it is missing or not one (a stranger's file is no peer)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("val_top1"), (int, float)):
            return data
    return None


def peer_scores(recipe_dir: Path, epoch: int, ingredient_id: str, start: str,
                warn: Callable[[str], None] = lambda line: None) -> list[float]:
    """The val top-1 of the other draws of this sweep (the same start) that reached rung `epoch`. A rung file
    is only a file: a peer with a checkpoint has its figure checked against that checkpoint's val history,
    which wins where they differ (one warning names them all)."""
    folder = rung_folder(recipe_dir, epoch)
    scores, disagree = [], []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = _read(path)
        if data is not None and path.stem != ingredient_id and data.get("start_fingerprint") == start:
            figure = float(data["val_top1"])
            checked = _checked(recipe_dir / path.stem / INGREDIENT_FILE, epoch, figure, start)
            if checked != figure:
                disagree.append(f"{path.stem} {figure:.2%} vs {'none' if checked is None else f'{checked:.2%}'}")
            if checked is not None:
                scores.append(checked)
    if disagree:
        warn(f"rung files at epoch {epoch} disagree with their draws' checkpoints ({'; '.join(disagree)}): the "
             "checkpoints' val history counts, and a draw whose checkpoint never reached the rung is left out")
    return scores


def _checked(checkpoint: Path, epoch: int, figure: float, start: str) -> float | None:
    """`figure` as a finished (or pruned) peer's checkpoint records it at `epoch` (None: not at all); as it
    is when there is no such checkpoint of this start to check it with (a peer still training)."""
    try:
        record = read_checkpoint(checkpoint).record if checkpoint.is_file() else None
    except SoupError:
        record = None
    if record is None or record.start.fingerprint != start:
        return figure
    history = [r for r in record.history if r.get("epoch") == epoch]
    return float(history[0]["val_top1"]) if history else None


def recipe_key(ingredient: Ingredient) -> str:
    """Which version of the draw a rung file is for: a folder deleted and retrained from another recipe under
    the same id must not take the old decision."""
    text = json.dumps(resumable(ingredient.recipe.to_dict()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decide(ingredient: Ingredient, run_dir: Path, record: dict, probe: dict | None, start: str,
           warn: Callable[[str], None] = lambda line: None) -> dict:
    """The decision at rung `record["epoch"]`: the one recorded in its rung file, or taken now and recorded."""
    prune, epoch, val = ingredient.prune, record["epoch"], record["val_top1"]
    path, key = rung_file(run_dir.parent, epoch, ingredient.id), recipe_key(ingredient)
    recorded = _read(path)
    if (recorded is not None and recorded.get("start_fingerprint") == start and recorded.get("recipe") == key
            and isinstance(recorded.get("decision"), dict)):
        return recorded["decision"]
    if prune.rule == "start":
        threshold, peers = probe["val_acc"], None
    else:
        scores = peer_scores(run_dir.parent, epoch, ingredient.id, start, warn)
        threshold, peers = (statistics.median(scores) if len(scores) >= MIN_PEERS else None), len(scores)
    decision = {"epoch": epoch, "val_top1": val, "threshold": threshold, "rule": prune.rule,
                "pruned": threshold is not None and val < threshold, "peers": peers}
    write_text_atomic(path, json.dumps({"id": ingredient.id, "val_top1": val, "start_fingerprint": start,
                                        "recipe": key, "decision": decision}, indent=2) + "\n")
    return decision


def at_rung(run, record: dict) -> dict:
    """What the epoch's record of `run` (soup.train.loop.Run) gains at a rung ({"rung": decision}); nothing
    off the rungs or without pruning. Rank 0 decides (it alone writes files) and tells the other ranks."""
    ingredient = run.ingredient
    if ingredient.prune is None or record["epoch"] not in judged_epochs(ingredient):
        return {}
    main = distributed.world().main

    def warn(line: str) -> None:
        run.console.print(f"  [yellow]warning[/]: {shown(line)}")

    decision = distributed.from_main(decide(ingredient, run.run_dir, record, run.probe, run.start_fingerprint, warn)
                                     if main else None)
    if decision["pruned"]:
        run.console.print(f"  {run.ingredient.id}: [yellow]{Rung.parse(decision).describe()}[/]; the next draw takes "
                          "its place")
    return {"rung": decision}


def judged_epochs(ingredient: Ingredient) -> list[int]:
    """The epochs a draw is judged at: its rungs, and under the `start` rule its final epoch too, so that a
    draw that passed its rungs and then fell below the start does not finish as if it kept the promise."""
    prune = ingredient.prune
    final = [ingredient.recipe.train.epochs] if prune.rule == "start" else []
    return sorted(set(prune.rungs + final))


def stopped(history: list[dict]) -> Rung | None:
    """The decision that pruned a run with this history (None: not pruned)."""
    return first_pruned(history)

