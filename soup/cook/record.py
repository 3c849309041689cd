"""What `soup cook` chose, added to the logs of the recipe folder it cooked from (`<out>/<name>/`, beside
summary.csv; soup.train.logs): one row of `soups.csv` per soup, and with TensorBoard installed a text
entry and the selection accuracy in the event files of `<out>/<name>/soups/`. Never inside an ingredient's
folder (`soup train` owns those); without TensorBoard the CSV alone, quietly: cooking asked for no logs.

These logs are a side product: one that cannot be written (a soups.csv that is a folder, not UTF-8, or
another program's CSV, which is never touched) is one warning, said before the work where it can be
checked, and never costs the soup itself.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

from rich.console import Console

from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint
from soup.models.files import atomic_path
from soup.models.runs import SOUPS_EVENTS, SOUPS_FILE
from soup.models.records import Record
from soup.text import printable, shown
from soup.train import logs

COLUMNS = ("time", "method", "soup", "members", "weights", "split", "selection_top1", "selection_nll", "steps")


def recipe_folders(ingredients: list[Checkpoint]) -> list[Path]:
    """The `<out>/<name>/` folders the ingredients were trained in; a checkpoint copied elsewhere has none."""
    folders = [c.path.parent.parent for c in ingredients if c.kind == "ingredient"
               and c.path.parent.name == c.record.id and c.path.parent.parent.name == c.record.name]
    return list(dict.fromkeys(folders))


def _blank(value):
    return "" if value is None else value


def soup_row(path: Path, record: Record) -> dict:
    selection, members = record.selection, record.members
    # A file name that is not valid UTF-8 keeps its bytes visible as \xNN escapes: the log stays UTF-8.
    soup = os.fsencode(path).decode("utf-8", errors="backslashreplace")
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": record.kind, "soup": soup,
            "members": ";".join(m.name for m in members),
            "weights": ";".join(f"{m.weight:.6g}" for m in members),
            "split": selection.split if selection else "", "selection_top1": _blank(selection and selection.top1),
            "selection_nll": _blank(selection and selection.loss),
            "steps": json.dumps(record.method.steps if record.method else [], separators=(",", ":"))}


def log_problem(folder: Path) -> str | None:
    """Why `folder`/soups.csv cannot take another row (it is a folder, unreadable, not UTF-8, or a CSV with
    columns soup never writes, which is not soup's to rewrite), or None."""
    path = folder / SOUPS_FILE
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        return f"{path} is not a file"
    try:
        header = next(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))), None)
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text, so not soup's log"
    except OSError as err:
        return f"cannot read {path}: {err.strerror or err}"
    if header is not None and not (set(header) <= set(COLUMNS) and {"method", "soup"} <= set(header)):
        columns = ", ".join(printable(c) for c in header[:4]) + (", ..." if len(header) > 4 else "")
        return f"{path} has columns soup's log does not ({columns}), so it is not soup's to rewrite"
    return None


def check_logs(ingredients: list[Checkpoint], console: Console) -> None:
    """Before the work: one warning per log the soup will not be added to (see log_problem)."""
    for folder in recipe_folders(ingredients):
        problem = log_problem(folder)
        if problem is not None:
            console.print(f"[yellow]warning[/]: {shown(problem)}; the soup will not be logged there")


def append_row(folder: Path, row: dict) -> int | None:
    """Add `row` to `folder`/soups.csv (rewritten whole, atomically, under the logs lock); its row count, or
    None when the log is not one to add to (log_problem)."""
    with logs.locked(folder):
        path = folder / SOUPS_FILE
        if log_problem(folder) is not None:
            return None
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))) if path.exists() else []
        rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, COLUMNS, restval="", extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(logs.spreadsheet_rows(rows))
        with atomic_path(path) as tmp:
            tmp.write_text(text.getvalue(), encoding="utf-8")
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


def record_soup(path: Path, record: Record, ingredients: list[Checkpoint], console: Console | None = None) -> None:
    """Log the soup at `path` (its checkpoint's `record`) in every recipe folder it cooked from. A log
    that cannot be written is one warning on `console` (a problem check_logs already said, none), never an
    error: the soup is written by then."""
    for folder in recipe_folders(ingredients):
        row = soup_row(path, record)
        try:
            count = append_row(folder, row)
            if count is not None and logs.available():
                write_events(folder, row, count)
        except (OSError, UnicodeError, ValueError, SoupError) as err:
            if console is not None:
                console.print(f"[yellow]warning[/]: the soup was written, but not logged in {shown(folder)}: "
                              f"{shown(getattr(err, 'strerror', None) or err)}")
