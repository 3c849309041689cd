"""`soup inspect`: why a soup chose what it chose, and whether ingredients can soup at all.

For each pair of checkpoints: do they share a start (fingerprint), how far apart are they, and the cosine
between their fine-tuning deltas θ − θ₀. Optionally, held-out accuracy along the straight line between two
of them: a dip in the middle (a loss barrier) means their average lands off both basins, and they will not
soup. Weights are read one tensor at a time, so this runs on ViT-B ingredients without a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from soup.cook.batchnorm import DEFAULT_IMAGES
from soup.cook.selector import Selector
from soup.cook.weights import rebuilt_starts, weighted_average
from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, tensors_across
from soup.models.records import BatchNormReset
from soup.text import print_legend, short_names, shown


def _layout_key(checkpoint: Checkpoint) -> tuple:
    return checkpoint.backbone, tuple(sorted(checkpoint.tensor_layout().items()))


def _grams(checkpoints: list[Checkpoint], origins: list[dict | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrices (float64) of the floating weights θᵢ and of the deltas θᵢ − originᵢ, in one pass."""
    n = len(checkpoints)
    raw = torch.zeros(n, n, dtype=torch.float64)
    delta = torch.zeros(n, n, dtype=torch.float64)
    for key, weights in tensors_across(checkpoints):
        if not weights[0].is_floating_point():
            continue
        matrix = torch.stack([w.double().flatten() for w in weights])
        raw += matrix @ matrix.T
        shifts = torch.stack([o[key].double().flatten() if o is not None else torch.zeros_like(matrix[0])
                              for o in origins])
        moved = matrix - shifts
        delta += moved @ moved.T
    return raw, delta


def pair_geometry(checkpoints: list[Checkpoint], console: Console | None = None) -> dict:
    """Per checkpoint its delta norm from its start; per pair: same start, distance, cosine of deltas.

    Distances compare any two checkpoints of one architecture; cosines only pairs that share a start,
    and only where the start can be rebuilt (offline: model.weights)."""
    console = console or Console(quiet=True)
    starts, errors = rebuilt_starts(checkpoints)
    notes = [f"start {start} not rebuilt ({err}): distances only" for start, err in errors.items()]
    groups: dict[tuple, list[int]] = {}
    for index, checkpoint in enumerate(checkpoints):
        groups.setdefault(_layout_key(checkpoint), []).append(index)
    norms: list[float | None] = [None] * len(checkpoints)
    pairs = []
    for members in groups.values():
        group = [checkpoints[i] for i in members]
        origins = [starts[c.fingerprint] for c in group]
        raw, delta = _grams(group, origins)
        for local, index in enumerate(members):
            if origins[local] is not None:
                norms[index] = math.sqrt(max(delta[local, local].item(), 0.0))
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                a, b = group[x], group[y]
                same = a.fingerprint == b.fingerprint
                distance = math.sqrt(max((raw[x, x] + raw[y, y] - 2 * raw[x, y]).item(), 0.0))
                cosine = None
                if same and origins[x] is not None:
                    denominator = math.sqrt(delta[x, x].item() * delta[y, y].item())
                    cosine = delta[x, y].item() / denominator if denominator > 0 else 0.0
                pairs.append({"a": a.name, "b": b.name, "a_path": str(a.path), "b_path": str(b.path),
                              "comparable": True, "same_start": same, "distance": distance, "cosine": cosine})
    keys = list(groups)
    for gi in range(len(keys)):
        for gj in range(gi + 1, len(keys)):
            for i in groups[keys[gi]]:
                for j in groups[keys[gj]]:
                    a, b = checkpoints[i], checkpoints[j]
                    pairs.append({"a": a.name, "b": b.name, "a_path": str(a.path), "b_path": str(b.path),
                                  "comparable": False, "same_start": a.fingerprint == b.fingerprint,
                                  "distance": None, "cosine": None})
    rows = [{"name": c.name, "path": str(c.path), "kind": c.kind, "backbone": c.backbone,
             "start": c.fingerprint, "delta_norm": norms[i]} for i, c in enumerate(checkpoints)]
    return {"checkpoints": rows, "pairs": pairs, "notes": notes}


def describe_soup(checkpoint: Checkpoint, console: Console) -> None:
    """What a soup's method recorded: members and weights, and each step it tried."""
    record = checkpoint.record
    selection, method = record.selection, record.method
    where = f" on {selection.split}" if selection else ""
    candidates = len(method.candidates or []) if method else 0
    console.print(f"[bold]{shown(checkpoint.name)}[/]: {shown(checkpoint.kind)} soup of "
                  f"{len(record.members)} of {candidates} candidates" +
                  (f", {selection.top1:.2%}{where}" if selection else ", cooked without data"))
    for member in record.members:
        console.print(f"  member {shown(member.name)}: weight {member.weight:.3f}")
    if method and method.get("start_weight") is not None:
        console.print(f"  the starting weights: weight {method.get('start_weight'):.3f}")
    for step in method.steps if method else []:
        if "candidate" in step:
            verdict = "kept" if step["kept"] else "left out: the average with it scored lower"
            console.print(f"  greedy step {shown(step['candidate'])}: {step['top1']:.2%}{where}, {verdict}")
        elif "k" in step:
            console.print(f"  top-k: k={step['k']} (+ {shown(step['added'])}): {step['top1']:.2%}{where}")
        elif "alpha" in step:
            console.print(f"  alpha {step['alpha']:g}: {step['top1']:.2%}{where}")
        elif "epoch" in step:
            console.print(f"  learned epoch {step['epoch']}: loss {step['loss']:.3f}, coefficients "
                          + " ".join(f"{c:.2f}" for c in step["coefficients"]))
    if method and method.get("stock") is not None:
        console.print(f"  stock: mean ratio toward the average {method.get('stock')['mean_ratio']:.3f}")
    if record.bn_reset is not None:
        console.print(f"  {record.bn_reset.describe()}")


def loss_line(a: Checkpoint, b: Checkpoint, points: int = 5, split: str = "val",
              data_root: str | Path | None = None, console: Console | None = None) -> dict:
    """Held-out accuracy at (1 − t)·A + t·B for `points` values of t in [0, 1], and the barrier: how far
    the line dips below the straight line between the endpoints' accuracies (0: no barrier)."""
    console = console or Console(quiet=True)
    if points < 2:
        raise SoupError("--points needs at least 2 (the two endpoints)")
    if _layout_key(a) != _layout_key(b) or a.classes != b.classes:
        raise SoupError(f"--line: {a.path} and {b.path} have different architectures or classes; no line "
                        "between them")
    # A BatchNorm net's mixes get statistics of their own, as a soup's would: averaged statistics alone
    # would show a barrier the soup does not have (REPAIR).
    select = Selector(a, split, data_root, members=[a, b], bn_images=DEFAULT_IMAGES, console=console)
    line = []
    for i in range(points):
        t = i / (points - 1)
        result = select(weighted_average([(a, 1 - t), (b, t)] if t <= 0.5 else [(b, t), (a, 1 - t)]))
        line.append({"t": t, "top1": result["top1"], "loss": result["loss"]})
    first, last = line[0]["top1"], line[-1]["top1"]
    barrier = max((1 - p["t"]) * first + p["t"] * last - p["top1"] for p in line)
    report = {"a": a.name, "b": b.name, "split": split, "line": line, "barrier": max(barrier, 0.0)}
    if select.reset is not None:  # the images the mixes' statistics were measured on
        report["bn_reset"] = BatchNormReset.parse(select.reset.record({})).images_only()
    return report


def print_inspection(report: dict, console: Console) -> None:
    backbones = {row["backbone"] for row in report["checkpoints"]}
    labels = short_names(row["name"] for row in report["checkpoints"])  # a sweep's long names by index
    table = Table(title="checkpoints", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    columns = ["#", "checkpoint", "kind"] + (["backbone"] if len(backbones) > 1 else []) + ["start", "‖Δ‖"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", "‖Δ‖") else "left",
                         no_wrap=column not in ("checkpoint", "backbone"))
    for i, row in enumerate(report["checkpoints"]):
        norm = "?" if row["delta_norm"] is None else f"{row['delta_norm']:.4g}"
        names = [labels[row["name"]], row["kind"]] + ([row["backbone"]] if len(backbones) > 1 else []) + [row["start"][:8]]
        table.add_row(str(i), *map(shown, names), norm)
    console.print(table)
    console.print("‖Δ‖: distance from the shared start θ₀ (the fine-tuning delta Δ = θ − θ₀)")
    print_legend(labels, console)
    index = {row["path"]: i for i, row in enumerate(report["checkpoints"])}
    if report["pairs"]:
        table = Table(title="pairs", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column in ("a", "b", "start", "distance", "cos(Δa, Δb)", "verdict"):
            table.add_column(column, justify="left" if column in ("verdict", "start") else "right",
                             no_wrap=column != "verdict")
        for pair in report["pairs"]:
            if not pair["comparable"]:
                verdict = "other model: ensemble"
            elif not pair["same_start"]:
                verdict = "[red]other start: no soup[/]"
            elif pair["cosine"] is None:
                verdict = "same start"
            elif pair["cosine"] > 0.98:
                verdict = "near duplicates"
            else:
                verdict = "can soup; try --line"
            distance = "-" if pair["distance"] is None else f"{pair['distance']:.4g}"
            cosine = "-" if pair["cosine"] is None else f"{pair['cosine']:.3f}"
            table.add_row(f"#{index[pair['a_path']]}", f"#{index[pair['b_path']]}",
                          "same" if pair["same_start"] else "[red]other[/]", distance, cosine, verdict)
        console.print(table)
    for note in report["notes"]:
        console.print(f"[yellow]note[/]: {shown(note)}")
    if "line" in report:
        line = report["line"]
        table = Table(title=f"the straight line {shown(line['a'])} (t=0) -> {shown(line['b'])} (t=1), "
                            f"on {line['split']}")
        for column in ("t", "top-1", "loss"):
            table.add_column(column, justify="right")
        for point in line["line"]:
            table.add_row(f"{point['t']:.2f}", f"{point['top1']:.2%}", f"{point['loss']:.3f}")
        console.print(table)
        console.print(f"barrier: {line['barrier']:.2%} below the straight line between the endpoints' accuracies "
                      "(near 0: one basin, they soup; large: averaging them lands between basins)")
