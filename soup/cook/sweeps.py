"""Where a sweep stands when its ingredients ran as separate jobs (a Slurm array, several machines on one
shared folder): which are finished, still running, stopped part-way, or not there at all.

`soup cook` reports this and cooks what is finished. Every ingredient's checkpoint lists the ids of its
whole sweep (`sweep_ids`), so one finished ingredient is enough to know what the others should be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from soup.models.checkpoint import Checkpoint
from soup.models.runs import INGREDIENT_FILE, LOCK_FILE, STATE_FILE, lock_held
from soup.text import shown


@dataclass
class SweepStatus:
    name: str
    expected: list[str] = field(default_factory=list)  # empty when no checkpoint says (older checkpoints)
    finished: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # a saved state, no checkpoint, nobody training it

    @property
    def missing(self) -> list[str]:
        seen = set(self.finished) | set(self.running) | set(self.unfinished)
        return [i for i in self.expected if i not in seen]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.running or self.unfinished)


def sweep_status(ingredients: list[Checkpoint], folders: list[Path]) -> list[SweepStatus]:
    """One status per recipe name among the ingredients found and the run folders below `folders`."""
    sweeps: dict[str, SweepStatus] = {}

    def status(name: str) -> SweepStatus:
        return sweeps.setdefault(name, SweepStatus(name))

    for checkpoint in ingredients:
        if checkpoint.kind != "ingredient":
            continue
        record = checkpoint.record
        item = status(record.name or "?")
        ingredient_id = record.id or checkpoint.path.parent.name
        if ingredient_id not in item.finished:
            item.finished.append(ingredient_id)
        for expected in record.sweep_ids or []:
            if expected not in item.expected:
                item.expected.append(expected)
    # Run folders are <out>/<name>/<id>/: a lock or a state without a checkpoint is a run not finished.
    run_dirs = {marker.parent for folder in folders if Path(folder).is_dir()
                for pattern in (STATE_FILE, LOCK_FILE) for marker in Path(folder).rglob(pattern)}
    for run_dir in sorted(run_dirs):
        if (run_dir / INGREDIENT_FILE).exists():
            continue
        item, ingredient_id = status(run_dir.parent.name), run_dir.name
        if lock_held(run_dir):
            item.running.append(ingredient_id)
        elif (run_dir / STATE_FILE).exists():
            item.unfinished.append(ingredient_id)
    return [sweeps[name] for name in sorted(sweeps)]


def report(statuses: list[SweepStatus], console: Console) -> None:
    """A warning line per incomplete sweep; nothing when every sweep is complete."""
    for item in statuses:
        if item.complete:
            continue
        total = len(item.expected) or len(item.finished) + len(item.running) + len(item.unfinished)
        parts = [f"{len(item.finished)} of {total} ingredients finished"]
        if item.running:
            parts.append(f"running: {', '.join(item.running)}")
        if item.unfinished:
            parts.append(f"unfinished (continue with soup train RECIPE --ingredient K --resume): "
                         f"{', '.join(item.unfinished)}")
        if item.missing:
            parts.append(f"missing: {', '.join(item.missing)}")
        cooking = f"cooking the {len(item.finished)} finished" if item.finished else "nothing of it to cook"
        console.print(f"[yellow]warning[/]: sweep {shown(item.name)}: {shown('; '.join(parts))}; {cooking}")


def leave_out_pruned(checkpoints: list[Checkpoint], paths: list, console: Console) -> list[Checkpoint]:
    """`checkpoints` less the draws a pruned search stopped at a rung (their record's `pruned`), with one
    line naming them; a checkpoint file named in `paths` is a deliberate choice: kept, with a warning."""
    named = {Path(p) for p in paths if Path(p).is_file()}
    kept, left = [], []
    for checkpoint in checkpoints:
        pruned = checkpoint.record.pruned if checkpoint.kind == "ingredient" else None
        if pruned is not None and checkpoint.path not in named:
            left.append(checkpoint)
            continue
        if pruned is not None:
            console.print(f"[yellow]warning[/]: {shown(checkpoint.name)} was pruned at epoch {pruned.epoch} "
                          "(search.prune); cooking it because its file is named")
        kept.append(checkpoint)
    if left:
        console.print(f"left out {len(left)} pruned draw{'s' if len(left) > 1 else ''} "
                      f"({shown(', '.join(c.name for c in left))}): search.prune stopped them at a rung; name a "
                      "checkpoint file to cook it anyway")
    return kept
