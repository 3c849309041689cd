"""`soup plot`: one picture of held-out accuracy: each ingredient (sorted), the greedy path step by step,
a top-k soup's curve (k -> accuracy), every soup, and the ingredients' ensemble as a reference line.
matplotlib comes with soup (a dependency); installed without it, the command says how to add it."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from soup.errors import SoupError
from soup.judge.evaluate import evaluate_rows
from soup.models.checkpoint import Checkpoint
from soup.models.files import atomic_path
from soup.score.evaluator import Evaluator, Predictions
from soup.score.stats import reliability
from soup.text import legend, printable, short_names, shown

LEGEND_CHARS = 110  # characters of the id legend's fixed-width font a line under the left axes
INSTALL_HINT = "soup plot needs matplotlib, a dependency of soup that is missing here: pip install matplotlib"


def _figure_class():
    try:
        # The object API, not pyplot: no GUI backend and no global state, also on a headless server.
        from matplotlib.figure import Figure
    except ImportError:
        raise SoupError(INSTALL_HINT) from None
    return Figure


def _label(name) -> str:
    """A name from outside as a figure shows it: on one line, in its order (soup.text.printable, as tables
    print it), a `$` as itself rather than the start of mathtext, and a leading `_` kept in the legend
    (matplotlib hides labels that start with one)."""
    text = printable(name).replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def draw(rows: list[dict], greedy: dict | None, path: str | Path, topk: dict | None = None) -> dict[str, list[float]]:
    """Write the PNG; returns each drawn series (label -> y values), read back from the figure. `greedy`
    and `topk` ({"name", "steps", "split"}) are a greedy soup's path and a top-k soup's curve."""
    Figure = _figure_class()
    split = rows[0]["split"] if rows else "?"
    ingredients = sorted((r for r in rows if r["kind"] == "ingredient"), key=lambda r: r["top1"])
    soups = [r for r in rows if r["kind"] not in ("ingredient", "ensemble")]
    ensemble = next((r for r in rows if r["kind"] == "ensemble"), None)
    # A sweep's long names by their short ids (soup.text.short_names), the settings in a legend under the axes.
    ids = short_names([r["name"] for r in rows] + [s["candidate"] for s in (greedy or {}).get("steps", [])]
                      + [p["added"] for p in (topk or {}).get("steps", [])])
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[3, 2]) if greedy or topk else (figure.subplots(), None)
    names = [_label(ids[r["name"]]) for r in ingredients] + [_label(r["name"]) for r in soups]
    left.plot(range(len(ingredients)), [r["top1"] for r in ingredients], "o-", color="tab:gray",
              label="ingredients (sorted)")
    for i, row in enumerate(soups):
        left.plot([len(ingredients) + i], [row["top1"]], marker="*", markersize=14, linestyle="none",
                  label=_label(row["name"] if row["name"] == row["kind"] else f"{row['name']} ({row['kind']})"))
    if ensemble:
        left.axhline(ensemble["top1"], linestyle="--", color="black", label=_label(ensemble["name"]))
    left.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    _id_legend(left, ids)
    left.set_ylabel(f"top-1 on {split}")
    left.set_title(f"ingredients, soups and ensemble on {split}")
    left.legend(fontsize=7, loc="best")
    if greedy:
        _greedy_path(right, greedy, ids)
    if topk:
        _topk_curve(right, topk, ids, label_ticks=not greedy)
    if right is not None:
        right.set_ylabel(f"top-1 on {(greedy or topk)['split']} (selection set)")
        right.set_title(" and ".join(f"{what}: {_label(record['name'])}" for what, record in
                                     (("greedy path", greedy), ("top-k curve", topk)) if record))
        right.legend(fontsize=7, loc="best")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    series = {}
    for axes in filter(None, (left, right)):
        for line in axes.get_lines():
            if not line.get_label().startswith("_"):
                series[line.get_label()] = [float(y) for y in line.get_ydata()]
    return series


def _id_legend(axes, ids: dict[str, str]) -> None:
    """Under the axes, what each short id stands for: a few entries a line, in a fixed-width font."""
    heading, entries = legend(ids)
    if not entries:
        return
    entries = [_label(entry) for entry in entries.values()]
    width = max(len(entry) for entry in entries) + 3
    per_line = max(1, LEGEND_CHARS // width)
    lines = ["".join(entry.ljust(width) for entry in entries[i:i + per_line]).rstrip()
             for i in range(0, len(entries), per_line)]
    axes.set_xlabel("\n".join([_label(heading)] + lines), fontsize=7, family="monospace", loc="left")


def _greedy_path(axes, greedy: dict, ids: dict[str, str]) -> None:
    steps = greedy["steps"]
    best, running = [], None
    for step in steps:
        running = step["top1"] if step["kept"] else running
        best.append(running)
    x = list(range(1, len(steps) + 1))
    axes.plot(x, best, "-", color="tab:green", label="greedy: soup so far")
    for kept, color, label in ((True, "tab:green", "greedy: kept"), (False, "tab:red", "greedy: left out")):
        points = [(i, s["top1"]) for i, s in zip(x, steps) if s["kept"] == kept]
        axes.plot([p[0] for p in points], [p[1] for p in points], "o" if kept else "x", color=color,
                  linestyle="none", label=label)
    axes.set_xticks(x, [_label(ids[s["candidate"]]) for s in steps], rotation=30, ha="right", fontsize=7)


def _topk_curve(axes, topk: dict, ids: dict[str, str], label_ticks: bool) -> None:
    """Step k of greedy and k of top-k add the same ingredient (both rank alike), so they share an x axis."""
    curve = topk["steps"]
    chosen = max(curve, key=lambda point: point["top1"])  # the soup's own rule: ties go to the smaller k
    axes.plot([p["k"] for p in curve], [p["top1"] for p in curve], "s--", color="tab:blue", markersize=4,
              label="top-k: uniform of the k best")
    axes.plot([chosen["k"]], [chosen["top1"]], marker="*", markersize=14, color="tab:blue", linestyle="none",
              label="top-k: chosen k")
    if label_ticks:
        axes.set_xticks([p["k"] for p in curve], [_label(f"k={p['k']}: +{ids[p['added']]}") for p in curve],
                        rotation=30, ha="right", fontsize=7)


def draw_reliability(evaluated: list[tuple[dict, Predictions]], path: str | Path) -> dict[str, list[float]]:
    """A reliability diagram: accuracy against mean confidence per confidence bin, one line per row
    (the diagonal is perfect calibration). Returns each row's drawn accuracies."""
    Figure = _figure_class()
    figure = Figure(figsize=(6, 5.5), layout="constrained")
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle=":", color="gray", label="_perfect calibration")
    series = {}
    for row, outcome in evaluated:
        bins = reliability(outcome.confidence, outcome.correct)
        filled = [i for i, count in enumerate(bins["count"]) if count]
        label = _label(f"{row['name']} (ECE {bins['gap']:.1%})")
        axes.plot([bins["confidence"][i] for i in filled], [bins["accuracy"][i] for i in filled], "o-",
                  markersize=3, label=label)
        series[row["name"]] = [bins["accuracy"][i] for i in filled]
    split = evaluated[0][0]["split"] if evaluated else "?"
    axes.set_xlabel("confidence (mean per bin)")
    axes.set_ylabel(f"accuracy on {split}")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(f"reliability on {split}: below the diagonal = overconfident")
    axes.legend(fontsize=7, loc="upper left")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return series


def draw_history(histories: dict[str, list[dict]], path: str | Path) -> dict[str, list[float]]:
    """Val accuracy per epoch, one line per ingredient (name -> its checkpoint's val_history)."""
    Figure = _figure_class()
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    series = {}
    for name, history in histories.items():
        points = [(h["epoch"], h["val_top1"]) for h in history if h.get("val_top1") is not None]
        axes.plot([p[0] for p in points], [p[1] for p in points], "o-", markersize=3, label=_label(name))
        series[name] = [p[1] for p in points]
    axes.set_xlabel("epoch")
    axes.set_ylabel("val top-1")
    axes.set_title("val accuracy per epoch, each ingredient")
    if series:
        axes.legend(fontsize=7, loc="best")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return series


def draw_pairs(geometry: dict, path: str | Path) -> list[list[float | None]]:
    """`soup inspect`'s pairs as a heatmap of cos(Δa, Δb) (from pair_geometry); grey: no cosine (another
    start, another architecture, or a start that could not be rebuilt). Returns the drawn matrix."""
    Figure = _figure_class()
    names = [row["name"] for row in geometry["checkpoints"]]
    index = {row["path"]: i for i, row in enumerate(geometry["checkpoints"])}
    matrix = [[1.0 if i == j else None for j in names] for i in names]
    for pair in geometry["pairs"]:
        a, b = index[pair["a_path"]], index[pair["b_path"]]
        matrix[a][b] = matrix[b][a] = pair["cosine"]
    size = max(4.0, 0.5 * len(names) + 2.5)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.subplots()
    values = [[float("nan") if v is None else v for v in line] for line in matrix]
    image = axes.imshow(values, cmap="viridis", vmin=min([0.0] + [v for line in matrix for v in line
                                                                   if v is not None]), vmax=1.0)
    axes.set_facecolor("lightgray")  # NaN cells draw transparent: the grey shows through
    for i, line in enumerate(matrix):
        for j, value in enumerate(line):
            axes.text(j, i, "-" if value is None else f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value is not None and value < 0.9 else "black")
    axes.set_xticks(range(len(names)), [_label(n) for n in names], rotation=60, ha="right", fontsize=7)
    axes.set_yticks(range(len(names)), [_label(n) for n in names], fontsize=7)
    axes.set_title("cos(Δa, Δb): fine-tuning deltas from the shared start")
    figure.colorbar(image, ax=axes, shrink=0.8)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return matrix


def recorded_steps(checkpoints: list[Checkpoint], kind: str) -> dict | None:
    """The steps a soup of `kind` recorded (greedy's path, top-k's curve), from the first such soup."""
    soup = next((c for c in checkpoints if c.kind == kind and c.record.method and c.record.method.steps), None)
    if soup is None:
        return None
    selection = soup.record.selection
    return {"name": soup.name, "steps": soup.record.method.steps, "split": selection.split if selection else "?"}


def plot_checkpoints(checkpoints: list[Checkpoint], path: str | Path, split: str = "val",
                     data_root: str | Path | None = None, console: Console | None = None,
                     reliability_path: str | Path | None = None) -> dict:
    """Evaluate `checkpoints` on `split` and draw them; the greedy path comes from a greedy soup's record.
    With `reliability_path`, also a reliability diagram of every row there."""
    console = console or Console(quiet=True)
    _figure_class()  # fail before spending time on evaluation
    ingredients = [c for c in checkpoints if c.kind == "ingredient"]
    evaluated = evaluate_rows(checkpoints, Evaluator(split, data_root), ensemble=len(ingredients) >= 2)
    rows = [row for row, _ in evaluated]
    greedy, topk = (recorded_steps(checkpoints, kind) for kind in ("greedy", "topk"))
    series = draw(rows, greedy, path, topk)
    console.print(f"wrote {shown(path)}: {len(ingredients)} ingredients, {len(rows) - len(ingredients)} soups/ensemble "
                  f"on {split}" + (", and the greedy path" if greedy else "")
                  + (", and the top-k curve" if topk else ""))
    result = {"path": Path(path), "series": series, "rows": rows}
    if reliability_path is not None:
        result["reliability"] = draw_reliability(evaluated, reliability_path)
        console.print(f"wrote {shown(reliability_path)}: reliability of {len(rows)} rows on {split}")
    return result
