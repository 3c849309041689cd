"""What `soup cook` chose, added to the logs of the recipe folder it cooked from (`<out>/<name>/`, beside
summary.csv; soup.train.logs): one row of `soups.csv` per soup, and with TensorBoard installed a text
entry and the selection accuracy in the event files of `<out>/<name>/soups/`. Never inside an ingredient's
folder (`soup train` owns those); without TensorBoard the CSV alone, quietly: cooking asked for no logs.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from soup.models.checkpoint import Checkpoint, write_text_atomic
from soup.train import logs

SOUPS_FILE = "soups.csv"
SOUPS_EVENTS = "soups"  # the event files' folder in the recipe folder: a run of its own in TensorBoard
COLUMNS = ("time", "method", "soup", "members", "weights", "split", "selection_top1", "selection_nll", "steps")


def recipe_folders(ingredients: list[Checkpoint]) -> list[Path]:
    """The `<out>/<name>/` folders the ingredients were trained in; a checkpoint copied elsewhere has none."""
    folders = [c.path.parent.parent for c in ingredients if c.kind == "ingredient"
               and c.path.parent.name == c.meta.get("id") and c.path.parent.parent.name == c.meta.get("name")]
    return list(dict.fromkeys(folders))


def soup_row(path: Path, meta: dict) -> dict:
    selection = meta.get("selection") or {}
    members = meta.get("members") or []
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": meta["kind"], "soup": str(path),
            "members": ";".join(m["name"] for m in members),
            "weights": ";".join(f"{m['weight']:.6g}" for m in members),
            "split": selection.get("split", ""), "selection_top1": selection.get("top1", ""),
            "selection_nll": selection.get("loss", ""),
            "steps": json.dumps(meta.get("steps") or [], separators=(",", ":"))}


def append_row(folder: Path, row: dict) -> int:
    """Add `row` to `folder`/soups.csv (rewritten whole, atomically, under the logs lock); its row count."""
    with logs.locked(folder):
        path = folder / SOUPS_FILE
        rows = list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []
        rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, COLUMNS, restval="", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, text.getvalue())
    return len(rows)


def write_events(folder: Path, row: dict, count: int) -> None:
    method = row["method"]
    lines = [f"**{method}** soup `{row['soup']}`: {len(row['members'].split(';'))} members"
             f"{', ' + str(row['split']) + ' top-1 ' + str(row['selection_top1']) if row['split'] else ''}", ""]
    lines += [f"- {name} (weight {weight})" for name, weight in zip(row["members"].split(";"),
                                                                    row["weights"].split(";"))]
    lines += ["", f"steps: `{row['steps']}`"]
    with logs.SummaryWriter(str(folder / SOUPS_EVENTS)) as writer:
        writer.add_text(f"soups/{method}", "\n".join(lines), count)
        if row["selection_top1"] != "":
            writer.add_scalar(f"soups/{method}/selection_top1", row["selection_top1"], count)


def record_soup(path: Path, meta: dict, ingredients: list[Checkpoint]) -> None:
    """Log the soup at `path` (its checkpoint metadata `meta`) in every recipe folder it cooked from."""
    for folder in recipe_folders(ingredients):
        row = soup_row(path, meta)
        count = append_row(folder, row)
        if logs.available():
            write_events(folder, row, count)
