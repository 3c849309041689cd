"""Draws that ended below their start: ingredients of a probed start (`model.probe`) whose val accuracy is
under the probe's, the frozen backbone + linear head they began from. Souping them rarely helps; narrowing
the search does. Each gets the reasons to suspect, measured against the rest of its sweep:

  underfit    its last train loss is above UNDERFIT x the sweep's median last train loss (too low an lr,
              too strong a regulariser or augmentation for the schedule)
  off-basin   its distance from the start, ‖θ − θ₀‖, is above OFF_BASIN x the sweep's median (too high an
              lr: it left the start's basin, and averages badly)

Both are relative to the sweep, so a sweep of one ingredient gets no reason, only the flag.
"""

from __future__ import annotations

import statistics

from rich.console import Console
from safetensors import safe_open

from soup.cook.weights import rebuilt_starts
from soup.models.checkpoint import Checkpoint
from soup.text import shown

UNDERFIT = 1.25
OFF_BASIN = 2.0


def _last_train_loss(checkpoint: Checkpoint) -> float | None:
    history = checkpoint.record.history
    loss = history[-1].get("train_loss") if history else None
    return None if loss is None else float(loss)  # a number or null: the record was checked at read


def start_distances(checkpoints: list[Checkpoint]) -> dict[str, float]:
    """‖θ − θ₀‖ over the floating tensors of each checkpoint whose start can be rebuilt (by path)."""
    # A start that is gone (offline, moved) gives no distance; the loss reason still works.
    starts, _ = rebuilt_starts(checkpoints)
    distances = {}
    for checkpoint in checkpoints:
        start = starts[checkpoint.fingerprint]
        if start is None:
            continue
        total = 0.0
        with safe_open(str(checkpoint.path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point():
                    total += (tensor.double() - start[key].double()).pow(2).sum().item()
        distances[str(checkpoint.path)] = total ** 0.5
    return distances


def _same_sweep(a: Checkpoint, b: Checkpoint) -> bool:
    return a.record.name == b.record.name and a.fingerprint == b.fingerprint


def below_start(checkpoints: list[Checkpoint]) -> list[dict]:
    """One record per ingredient that ended below its probed start: name, path, val_acc, start_acc and the
    reasons to suspect (see the module's docstring). Ingredients without a probe have no measured start."""
    ingredients = [c for c in checkpoints if c.kind == "ingredient" and c.record.probe is not None]
    below = [c for c in ingredients if c.record.probe.val_acc is not None and c.record.val_acc is not None
             and c.record.val_acc < c.record.probe.val_acc]
    if not below:
        return []
    losses = {str(c.path): _last_train_loss(c) for c in ingredients}
    # Only the sweeps of draws below their start are compared: measure no other ingredient's distance.
    distances = start_distances([c for c in ingredients if any(_same_sweep(c, b) for b in below)])
    records = []
    for checkpoint in below:
        sweep = [c for c in ingredients if _same_sweep(c, checkpoint)]
        reasons = []
        loss, others = losses[str(checkpoint.path)], [losses[str(c.path)] for c in sweep]
        known = [x for x in others if x is not None]
        if loss is not None and len(known) > 1 and loss > UNDERFIT * statistics.median(known):
            reasons.append(f"underfit: train loss {loss:.3g}, {loss / statistics.median(known):.1f}x the sweep's median")
        distance, spread = distances.get(str(checkpoint.path)), [distances.get(str(c.path)) for c in sweep]
        spread = [x for x in spread if x is not None]
        if distance is not None and len(spread) > 1 and distance > OFF_BASIN * statistics.median(spread):
            reasons.append(f"off-basin: {distance:.3g} from the start, {distance / statistics.median(spread):.1f}x "
                           "the sweep's median")
        pruned = checkpoint.record.pruned
        records.append({"name": checkpoint.name, "path": str(checkpoint.path), "val_acc": checkpoint.record.val_acc,
                        "start_acc": checkpoint.record.probe.val_acc, "reasons": reasons,
                        "pruned": pruned.dump() if pruned else None})
    return records


def flag_rows(rows: list[dict], checkpoints: list[Checkpoint]) -> list[dict]:
    """Give each ingredient row of `soup eval` its `below_start` record (None when not below); the records."""
    records = below_start(checkpoints)
    flagged = {record["path"]: record for record in records}
    for row in rows:
        if row["kind"] == "ingredient":
            row["below_start"] = flagged.get(row["path"])
    return records


def print_below_start(records: list[dict], checkpoints: list[Checkpoint], console: Console) -> None:
    """Print `records` (from below_start) out of the ingredients among `checkpoints`."""
    total = sum(c.kind == "ingredient" for c in checkpoints)
    for line in describe_below_start(records, total):
        console.print(f"[yellow]{line}[/]" if not line.startswith(" ") else line)


def describe_below_start(records: list[dict], total: int) -> list[str]:
    """The lines a summary prints for `records` (from below_start) out of `total` ingredients."""
    if not records:
        return []
    lines = [f"{len(records)} of {total} ingredients ended below the probed start they began from; narrow the "
             "search (the lr range, augmentation, epochs) rather than soup them:"]
    for record in records:
        why = "; ".join(record["reasons"]) or "no reason stands out against the sweep"
        if record.get("pruned"):
            why += f"; pruned at epoch {record['pruned'].get('epoch')}, not cooked by default"
        lines.append(f"  {shown(record['name'])}: {record['val_acc']:.2%} on val, start {record['start_acc']:.2%} "
                     f"({why})")
    return lines
