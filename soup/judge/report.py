"""The evaluation table and what makes its figures honest: bootstrap intervals per row, paired
differences to a reference row with McNemar p-values, per-class breakdowns; and the table of a recipe's
trained ingredients (`soup train`). Statistics come from soup.score (stats, compare); this module attaches
and prints them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table

from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import Ingredient
from soup.score import stats
from soup.score.calibrate import temperature_label
from soup.score.compare import p_value, points
from soup.score.evaluator import Predictions
from soup.text import print_legend, printable, short_names, shown

# At a narrow console these columns are left out, first to last, until the table fits (docs/evaluating.md: soup eval);
# checkpoint, top-1 and its interval, the difference and p always stay. The checkpoint name folds.
DROP_ORDER = ("images", "members", "kind", "top-5", "NLL", "ECE", "Δ 95% CI")
SOUPLESS = ("ingredient", "ensemble")


def to_json(data) -> str:
    """`data` as JSON for scripts (--json). Bare NaN or Infinity is not JSON, and a parser would choke on
    it: a non-finite float (the loss of a diverged model) is written as null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        return [finite(item) for item in value] if isinstance(value, (list, tuple)) else value
    return json.dumps(finite(data), indent=2, allow_nan=False)


def default_reference(rows: list[dict]) -> str | None:
    """"best" when soups sit beside ingredients (a soup's claim is its gain over the best ingredient); with
    --tta and one checkpoint, its plain row (what the views gain)."""
    kinds = {row["kind"] for row in rows}
    if "ingredient" in kinds and kinds - set(SOUPLESS):
        return "best"
    plain = [row for row in rows if not row.get("tta") and row["kind"] != "ensemble"]
    return plain[0]["name"] if len(plain) == 1 and len(rows) > 1 and rows[1].get("tta") else None


def reference_index(rows: list[dict], ref: str) -> int:
    """`ref`: "best" (the best ingredient on this split, without --tta: what the soups' claims were about),
    a row's name, or a kind only one row has."""
    if ref == "best":
        ingredients = [i for i, row in enumerate(rows) if row["kind"] == "ingredient" and not row.get("tta")]
        if not ingredients:
            raise SoupError("--compare best needs an ingredient among the checkpoints; name a row instead")
        return max(ingredients, key=lambda i: rows[i]["top1"])  # ties: the first listed
    for matches in ([i for i, r in enumerate(rows) if r["name"] == ref],
                    [i for i, r in enumerate(rows) if r["kind"] == ref and not r.get("tta")]):
        if len(matches) == 1:
            return matches[0]
    names = ", ".join(row["name"] for row in rows)
    raise SoupError(f"--compare {ref}: no single row of that name or kind; use best or one of: {names}")


def add_statistics(evaluated: list[tuple[dict, Predictions]], resamples: int = stats.RESAMPLES,
                   compare: str | None = None, seed: int = stats.SEED) -> list[dict]:
    """The rows, each with its top-1 interval (top1_low/top1_high; None when `resamples` is 0) and, against
    the `compare` row, a "compare" record (ref, diff, low, high, p, selection_set) for every other row
    that read the same images. One set of resamples serves all rows, so differences are paired."""
    rows = [row for row, _ in evaluated]
    ref = reference_index(rows, compare) if compare else None
    groups: dict[int, list[int]] = {}  # rows reading the same images share resamples
    for i, (_, outcome) in enumerate(evaluated):
        first = next((g for g in groups if evaluated[g][1].pairs_with(outcome)), i)
        groups.setdefault(first, []).append(i)
    for first, members in groups.items():
        in_group = ref in members
        correct = torch.stack([evaluated[i][1].correct for i in members])
        bounds = (stats.intervals(correct, members.index(ref) if in_group else None, resamples, seed)
                  if resamples > 0 else None)
        for j, i in enumerate(members):
            row = rows[i]
            row["top1_low"] = bounds["low"][j] if bounds else None
            row["top1_high"] = bounds["high"][j] if bounds else None
            row["compare"] = None
            if ref is None or i == ref:
                continue
            if not in_group:
                row["compare"] = {"ref": rows[ref]["name"], "unpaired": True}
                continue
            row["compare"] = {
                "ref": rows[ref]["name"], "diff": row["top1"] - rows[ref]["top1"],
                "low": bounds["diff_low"][j] if bounds else None,
                "high": bounds["diff_high"][j] if bounds else None,
                "p": stats.mcnemar(evaluated[i][1].correct, evaluated[ref][1].correct),
                "selection_set": bool(row["selection_set"] or rows[ref]["selection_set"]),
            }
    return rows


def top1_interval(row: dict) -> str:
    """A row's top-1 95% interval in percent, "" where it has none."""
    low = row.get("top1_low")
    return "" if low is None else f"{low * 100:.1f}–{row['top1_high'] * 100:.1f}"


def _columns(rows: list[dict]) -> dict:
    """Column name -> (justify, cell of a row); those without data anywhere are left out."""
    def top1(row):
        return f"{row['top1']:.2%}" + (" *" if row["selection_set"] else "")

    def delta(row):
        c = row.get("compare")
        if c is None:
            return "ref" if any((r.get("compare") or {}).get("ref") == row["name"] for r in rows) else ""
        return "unpaired" if c.get("unpaired") else points(c["diff"]) + (" *" if c["selection_set"] else "")

    def delta_interval(row):
        c = row.get("compare") or {}
        return "" if c.get("low") is None else f"{points(c['low'])}, {points(c['high'])}"

    columns = {"kind": ("left", lambda r: r["kind"]), "members": ("right", lambda r: str(r["members"])),
               "top-1": ("right", top1), "95% CI": ("right", top1_interval),
               "top-5": ("right", lambda r: f"{r['top5']:.1%}"), "NLL": ("right", lambda r: f"{r['nll']:.3f}"),
               "ECE": ("right", lambda r: f"{r['ece']:.1%}"), "Δ pts": ("right", delta),
               "Δ 95% CI": ("right", delta_interval),
               "p": ("right", lambda r: p_value(r["compare"]["p"]) if "p" in (r.get("compare") or {}) else ""),
               "images": ("right", lambda r: str(r["n"]))}
    return {name: spec for name, spec in columns.items() if any(spec[1](row) for row in rows)}


def eval_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The table's column names and each row's cells, as `soup eval` prints them (for `soup report`'s page)."""
    columns = _columns(rows)
    return list(columns), [[printable(cell(row)) for _, cell in columns.values()] for row in rows]


def _table(rows: list[dict], columns: dict, title: str) -> Table:
    labels = short_names(row["name"] for row in rows)  # a sweep's long names by index: no row wraps
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, show_edge=False)
    # A label folds only when longer than 40: narrower, the figures' columns are left out first (DROP_ORDER).
    table.add_column("checkpoint", overflow="fold", min_width=min(40, max([16] + [len(v) for v in labels.values()])))
    cells = [[printable(cell(row)) for _, cell in columns.values()] for row in rows]
    for j, (name, (justify, _)) in enumerate(columns.items()):
        # A figure is never cut or wrapped: its column is as wide as its widest cell, or left out.
        width = max([len(name)] + [len(line[j]) for line in cells])
        table.add_column(name, justify=justify, no_wrap=True, min_width=width)
    for row, line in zip(rows, cells):
        label = " ".join(filter(None, (labels[row["name"]], temperature_label(row.get("temperature", 1.0)))))
        table.add_row(shown(label), *map(shown, line))
    return table


def print_eval_table(rows: list[dict], split: str, console: Console, title: str | None = None) -> None:
    """The rows as a table that fits the console: DROP_ORDER says which columns go first."""
    columns, dropped = _columns(rows), []
    table = _table(rows, columns, title or f"accuracy on {split}")
    unbounded = console.options.update_width(10_000)  # measure what the table needs, not what it is given
    for name in DROP_ORDER:
        if Measurement.get(console, unbounded, table).minimum <= console.width:
            break
        if name in columns:
            del columns[name]
            dropped.append(name)
            table = _table(rows, columns, title or f"accuracy on {split}")
    console.print(table)
    _footnotes(rows, split, dropped, console)
    print_legend([row["name"] for row in rows], console)


def _footnotes(rows: list[dict], split: str, dropped: list[str], console: Console) -> None:
    compared = [r["compare"] for r in rows if r.get("compare")]
    labels = short_names(row["name"] for row in rows)
    if any(r.get("top1_low") is not None for r in rows):
        console.print(f"95% CI: bootstrap over the {rows[0]['n']} images (resampled with a fixed seed).")
    if compared:
        console.print(f"Δ pts: top-1 minus {shown(labels[compared[0]['ref']])} on the same images, with its paired "
                      "95% CI; p: exact McNemar test (small p: unlikely to be noise).")
    if any(c.get("unpaired") for c in compared):
        console.print("unpaired: this row read other images than the reference; no paired comparison.")
    if any(row["selection_set"] for row in rows):
        console.print(f"* measured on {split}, the set that selected this soup: an optimistic figure; "
                      "a split the soup never saw gives the honest one. Its Δ and p are not a test: the "
                      "soup was chosen to score well on these very images.")
    if dropped:
        console.print(f"left out at this width: {', '.join(dropped)} (a wider terminal or --json shows all).")


def print_per_class(row: dict, report: dict, console: Console) -> None:
    worst = Table(title=f"hardest classes for {shown(row['name'])}", padding=(0, 1))
    for column in ("class", "top-1", "images"):
        worst.add_column(column, justify="left" if column == "class" else "right", overflow="fold")
    for item in report["worst"]:
        worst.add_row(shown(item["class"]), f"{item['accuracy']:.1%}", str(item["images"]))
    confused = Table(title="most confused pairs", padding=(0, 1))
    for column in ("true class", "predicted as", "images", "share"):
        confused.add_column(column, justify="left" if "class" in column or "as" in column else "right",
                            overflow="fold")
    for item in report["confused"]:
        confused.add_row(shown(item["true"]), shown(item["predicted"]), str(item["images"]),
                         f"{item['share']:.1%}")
    console.print(worst)
    console.print(confused)


def add_per_class(evaluated: list[tuple[dict, Predictions]], k: int) -> tuple[dict, dict]:
    """The best row (highest top-1) and its per-class report, also stored under its "per_class"."""
    row, outcome = max(evaluated, key=lambda pair: pair[0]["top1"])
    row["per_class"] = stats.per_class(outcome.predicted, outcome.targets, outcome.classes, k)
    return row, row["per_class"]


def ingredient_table(name: str, results: list[tuple[Ingredient, Path]]) -> RenderableType:
    """Each ingredient's id (its sweep index and settings) and val accuracy; where the checkpoints are, once
    below (a path per row would wrap every row at 80 columns)."""
    folders = {path.parent.parent for _, path in results}
    where = (f"checkpoints: {shown(folders.pop())}/<ingredient>/{shown(results[0][1].name)}"
             if len(folders) == 1 and len({path.name for _, path in results}) == 1 else None)
    table = Table(title=f"{name}: ingredients")
    for column in ("ingredient", "val acc") + (() if where else ("checkpoint",)):
        table.add_column(column, no_wrap=column != "checkpoint")
    for item, path in results:
        record = read_checkpoint(path).record
        at = f" (pruned at epoch {record.pruned.epoch})" if record.pruned else ""
        table.add_row(shown(item.id), f"{record.val_acc:.2%}{at}", *(() if where else (shown(path),)))
    return Group(table, where) if where else table
