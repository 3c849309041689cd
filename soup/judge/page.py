"""`soup report`: one self-contained HTML page for a whole study: the recipe and its search space, the
ingredients, soups beside them and the ensemble, greedy's steps, the pair geometry, calibration and the
hardest classes. Every figure comes from the code behind `soup eval --json`, `soup inspect` and `soup
plot`; this module only lays their outputs out. Plots are embedded as PNG data URIs, so the file opens from
disk with no server and no network; without matplotlib the tables still write, with a line per plot."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

import yaml
from rich.console import Console

from soup.cook.diagnose import pair_geometry
from soup.data.outputs import check_output, data_roots
from soup.errors import SoupError
from soup.judge import plot
from soup.judge.evaluate import evaluate_rows
from soup.judge.report import (SOUPLESS, add_per_class, add_statistics, default_reference, eval_cells,
                               top1_interval)
from soup.models.checkpoint import Checkpoint
from soup.models.files import write_text_atomic
from soup.recipe.search import describe
from soup.score import stats
from soup.score.evaluator import Evaluator
from soup.text import printable, shown

PER_CLASS = 5
NO_PLOT = "plot left out: matplotlib is not installed (pip install matplotlib draws it)"

# Sorts a table by the clicked header (numbers as numbers), and the ingredients by top-1 on load, so the
# best sits on top and a DOM dump shows the script ran.
SCRIPT = """
function sortBy(th) {
  var table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
  var descending = th.getAttribute("aria-sort") !== "descending";
  table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[column].getAttribute("data-sort"), y = b.cells[column].getAttribute("data-sort");
    var nx = parseFloat(x), ny = parseFloat(y);
    var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
    return descending ? -order : order;
  });
  rows.forEach(function (row) { body.appendChild(row); });
}
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () { sortBy(th); });
});
var first = document.querySelector("#ingredients th[data-default]");
if (first) { sortBy(first); }
"""

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1150px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { padding: 0.2em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
table.sortable th { cursor: pointer; background: #f3f3f3; }
th[aria-sort=descending]::after { content: " \\25BC"; } th[aria-sort=ascending]::after { content: " \\25B2"; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
p.missing, p.note { color: #666; font-style: italic; }
"""


def esc(value) -> str:
    """A name from outside (a class, a checkpoint, a setting) as page text: one line, no markup."""
    return html.escape(printable(value))


def esc_lines(text: str) -> str:
    """Several lines for a <pre>: each line escaped on its own, the line breaks kept."""
    return "\n".join(esc(line) for line in text.splitlines())


def _cell(text, sort=None, klass: str = "") -> str:
    key = text if sort is None else sort
    attributes = f' class="{klass}"' if klass else ""
    return f'<td data-sort="{esc(key)}"{attributes}>{esc(text)}</td>'


def _table(headers: list[str], body: list[str], table_id: str = "", sortable: bool = True,
           default: str | None = None) -> str:
    heads = "".join(f"<th{' data-default' if h == default else ''}>{esc(h)}</th>" for h in headers)
    attributes = (f' id="{table_id}"' if table_id else "") + (' class="sortable"' if sortable else "")
    return f"<table{attributes}><thead><tr>{heads}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def collect(checkpoints: list[Checkpoint], evaluator: Evaluator, resamples: int = stats.RESAMPLES) -> dict:
    """Everything the page shows, from the functions behind `soup eval --ensemble --json` (rows with
    intervals and paired Δ against the best ingredient, per-class) and `soup inspect --json` (pairs)."""
    ingredients = [c for c in checkpoints if c.kind == "ingredient"]
    evaluated = evaluate_rows(checkpoints, evaluator, ensemble=len(ingredients) >= 2)
    rows = add_statistics(evaluated, resamples, default_reference([r for r, _ in evaluated]))
    worst = add_per_class(evaluated, PER_CLASS)
    soups = [pair for pair in evaluated if pair[0]["kind"] not in SOUPLESS]
    calibrated = max(soups or evaluated, key=lambda pair: pair[0]["top1"])
    greedy = plot.recorded_steps(checkpoints, "greedy")
    return {"split": evaluator.split, "checkpoints": checkpoints, "ingredients": ingredients, "rows": rows,
            "evaluated": evaluated, "per_class": worst, "reliability": calibrated, "greedy": greedy,
            "geometry": pair_geometry(ingredients) if ingredients else None}


def _png(draw, *args) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "figure.png"
        draw(*args, path)
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def plot_available() -> bool:
    try:
        plot._figure_class()  # the one place that knows whether matplotlib is there
    except SoupError:
        return False
    return True


def figures(study: dict) -> dict[str, str | None]:
    """Each plot as a data URI; None for every one when matplotlib is missing."""
    if not plot_available():
        return dict.fromkeys(("soups", "history", "pairs", "reliability"))
    histories = {c.name: c.record.history for c in study["ingredients"]}
    geometry = study["geometry"]
    return {"soups": _png(plot.draw, study["rows"], study["greedy"]),
            "history": _png(plot.draw_history, histories) if histories else None,
            "pairs": _png(plot.draw_pairs, geometry) if geometry and geometry["pairs"] else None,
            "reliability": _png(plot.draw_reliability, [study["reliability"]])}


def _figure(uri: str | None, alt: str, drawable: bool) -> str:
    if uri:
        return f'<img src="{uri}" alt="{esc(alt)}">'
    return f'<p class="missing">{esc(NO_PLOT if not drawable else "nothing to plot: " + alt)}</p>'


def _recipe_section(study: dict) -> str:
    recipes = {}
    for checkpoint in study["ingredients"] or study["checkpoints"]:
        recipes.setdefault(str(checkpoint.recipe.get("name", checkpoint.name)), checkpoint.recipe)
    parts = ["<h2>Recipe</h2>"]
    for name, recipe in recipes.items():
        # Each ingredient stores its resolved recipe (sweep and search expanded away): the space is what
        # the ingredients' settings took.
        space: dict[str, list] = {}
        for checkpoint in study["ingredients"]:
            if str(checkpoint.recipe.get("name", checkpoint.name)) == name:
                for key, value in (checkpoint.record.settings or {}).items():
                    if value not in space.setdefault(key, []):
                        space[key].append(value)
        parts.append(f"<h3>{esc(name)}</h3><p>search space (the values its ingredients took):</p><pre>"
                     + esc_lines(yaml.safe_dump(space, sort_keys=False) if space else "none (one ingredient)")
                     + "</pre><details><summary>the whole recipe</summary><pre>"
                     + esc_lines(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)) + "</pre></details>")
    return "".join(parts)


def _ingredients_section(study: dict) -> str:
    by_path = {row["path"]: row for row in study["rows"]}
    split, body = study["split"], []
    for checkpoint in study["ingredients"]:
        row = by_path[str(checkpoint.path)]
        history = checkpoint.record.history
        seconds = sum(h.get("seconds") or 0.0 for h in history)
        settings = describe(checkpoint.record.settings or {})
        pruned = checkpoint.record.pruned  # a search.prune draw stopped at a rung: shown, and not cooked by default
        name = checkpoint.name + (f" (pruned at epoch {pruned.epoch})" if pruned else "")
        body.append(f'<tr data-path="{esc(row["path"])}">' + _cell(name) + _cell(settings, klass="text")
                    + _cell(f"{row['top1']:.2%}", row["top1"]) + _cell(top1_interval(row), row.get("top1_low") or "")
                    + _cell(str(len(history)), len(history)) + _cell(f"{seconds:.1f} s", seconds) + "</tr>")
    top1 = f"top-1 on {split}"
    table = _table(["ingredient", "settings", top1, "95% CI", "epochs", "time"], body, "ingredients", default=top1)
    return (f"<h2>Ingredients</h2><p class=\"note\">Click a header to sort. Time: the epochs' training "
            f"seconds.</p>{table}<h3>val accuracy per epoch</h3>")


def _eval_section(study: dict, uri: str | None, drawable: bool) -> str:
    rows = study["rows"]
    names, cells = eval_cells(rows)
    body = []
    for row, line in zip(rows, cells):
        compare = row.get("compare") or {}
        data = {"kind": row["kind"], "top1": row["top1"], "top1-low": row.get("top1_low"),
                "top1-high": row.get("top1_high"), "diff": compare.get("diff"), "diff-low": compare.get("low"),
                "diff-high": compare.get("high")}
        attributes = "".join(f' data-{key}="{esc(repr(value) if isinstance(value, float) else value)}"'
                             for key, value in data.items() if value is not None)
        body.append(f'<tr data-name="{esc(row["name"])}"{attributes}>' + _cell(row["name"])
                    + "".join(_cell(text) for text in line) + "</tr>")
    reference = next((r["compare"]["ref"] for r in rows if r.get("compare") and "ref" in r["compare"]), None)
    note = (f"Δ pts: top-1 minus {esc(reference)} on the same images, with its paired 95% CI; p: exact "
            "McNemar test. " if reference else "")
    if any(row["selection_set"] for row in rows):
        note += f"*: measured on {esc(study['split'])}, the set that selected this soup (optimistic, not a test)."
    return (f"<h2>Soups, ingredients and the ensemble on {esc(study['split'])}</h2>"
            f"{_table(['checkpoint'] + names, body, 'eval')}<p class=\"note\">{note}</p>"
            + _statistics_note(study) + _figure(uri, "soups", drawable))


def _statistics_note(study: dict) -> str:
    """Each soup's BatchNorm statistics: re-estimated for its weights, kept, or averaged."""
    lines = [f"{esc(c.name)}: {esc(text)}" for c in study["checkpoints"]
             if c.kind != "ingredient" and c.record.bn_reset and (text := c.record.bn_reset.describe())]
    return f'<p class="note">{"<br>".join(lines)}</p>' if lines else ""


def _greedy_section(study: dict) -> str:
    greedy = study["greedy"]
    if greedy is None:
        return "<h2>Greedy's steps</h2><p class=\"note\">no greedy soup among the checkpoints.</p>"
    body = ["<tr>" + _cell(str(i), i) + _cell(step["candidate"], klass="text")
            + _cell(f"{step['top1']:.2%}", step["top1"])
            + _cell("kept" if step["kept"] else "left out", klass="text") + "</tr>"
            for i, step in enumerate(greedy["steps"], 1)]
    return (f"<h2>Greedy's steps: {esc(greedy['name'])}</h2>"
            + _table(["step", "candidate", f"top-1 on {greedy['split']}", "verdict"], body, "greedy",
                     sortable=False))


def _pairs_section(study: dict, uri: str | None, drawable: bool) -> str:
    geometry = study["geometry"]
    if not geometry or not geometry["pairs"]:
        return "<h2>Pairs</h2><p class=\"note\">fewer than two ingredients: no pairs.</p>"
    body = []
    for pair in geometry["pairs"]:
        distance = "-" if pair["distance"] is None else f"{pair['distance']:.4g}"
        cosine = "-" if pair["cosine"] is None else f"{pair['cosine']:.3f}"
        body.append("<tr>" + _cell(pair["a"]) + _cell(pair["b"], klass="text")
                    + _cell("same" if pair["same_start"] else "other", klass="text")
                    + _cell(distance, pair["distance"] or "") + _cell(cosine, pair["cosine"] or "") + "</tr>")
    notes = "".join(f'<p class="note">{esc(note)}</p>' for note in geometry["notes"])
    return ("<h2>Pairs (soup inspect)</h2><p class=\"note\">cos(Δa, Δb) near 1: near duplicates; lower: "
            "ingredients that moved apart from their shared start, the ones a soup gains from.</p>"
            + _figure(uri, "pairs", drawable) + _table(["a", "b", "start", "distance", "cos(Δa, Δb)"], body, "pairs")
            + notes)


def _per_class_section(study: dict, uri: str | None, drawable: bool) -> str:
    calibrated = study["reliability"][0]
    row, report = study["per_class"]
    worst = ["<tr>" + _cell(item["class"]) + _cell(f"{item['accuracy']:.1%}", item["accuracy"])
             + _cell(str(item["images"]), item["images"]) + "</tr>" for item in report["worst"]]
    confused = ["<tr>" + _cell(item["true"]) + _cell(item["predicted"], klass="text")
                + _cell(str(item["images"]), item["images"]) + _cell(f"{item['share']:.1%}", item["share"]) + "</tr>"
                for item in report["confused"]]
    return (f"<h2>Calibration of {esc(calibrated['name'])}</h2>" + _figure(uri, "reliability", drawable)
            + f"<h2>Hardest classes for {esc(row['name'])}</h2>"
            + _table(["class", "top-1", "images"], worst, "worst")
            + "<h3>most confused pairs</h3>" + _table(["true class", "predicted as", "images", "share"], confused,
                                                     "confused"))


def render(study: dict, uris: dict[str, str | None]) -> str:
    """The page: ASCII only (other characters as references), so no file encoding can garble it."""
    drawable = plot_available()
    names = sorted({str(c.recipe.get("name", c.name)) for c in study["ingredients"]}) or ["checkpoints"]
    title = "soup report: " + ", ".join(names)
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f"<p class=\"note\">{len(study['checkpoints'])} checkpoints on {esc(study['split'])}, "
            f"{study['rows'][0]['n']} images.</p>"
            + _recipe_section(study) + _ingredients_section(study) + _figure(uris["history"], "history", drawable)
            + _eval_section(study, uris["soups"], drawable) + _greedy_section(study)
            + _pairs_section(study, uris["pairs"], drawable) + _per_class_section(study, uris["reliability"], drawable)
            + f"<script>{SCRIPT}</script></body></html>\n")
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_report(checkpoints: list[Checkpoint], path: str | Path, evaluator: Evaluator,
                 console: Console | None = None, inputs: list = (), overwrite: bool = False) -> dict:
    """Evaluate, draw and write the page at `path` (atomically; checked before any work, never over an
    input, a checkpoint or data, an existing page only with `overwrite`); returns what it showed."""
    console = console or Console(quiet=True)
    check_output(path, list(inputs), overwrite, what="report", roots=data_roots(checkpoints, evaluator.root))
    study = collect(checkpoints, evaluator)
    uris = figures(study)
    write_text_atomic(path, render(study, uris))
    drawn = sum(1 for uri in uris.values() if uri)
    console.print(f"wrote {shown(path)}: {len(study['rows'])} rows on {evaluator.split}, {drawn} plots"
                  + ("" if drawn else f" ({NO_PLOT})"))
    return study
