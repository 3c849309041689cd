"""`soup demo`: the whole path on generated sketches, offline, on a CPU, in about two minutes.

1. The start is the one soup ships (soup.models.starts, docs/start.md): a small ViT of DinoV2's architecture
   pretrained on 600 procedural glyph classes, the stand-in for DinoV2's weights. The fine-tuning data is
   another domain, as ImageNet-Sketch is for DinoV2: 16 sketch shapes on smudged pages that its
   pretraining never drew.
2. Fine-tune ingredients from it as the reference recipe does: 75% of the backbone frozen, so the frozen
   prefix's tokens are computed once and cached (the output's "data path: prefix cache"); a linear probe
   first (LP-FT), which every ingredient starts from; lr, weight decay, label smoothing and seed drawn by a
   random search, as the model-soups paper drew its ingredients, pruned where a draw falls below the probed
   start (and refilled).
3. Cook every soup that costs no extra training: each registered method that cooks from the ingredients
   alone (uniform, greedy, top-k, guided, learned, Model Stock), and a WiSE-FT interpolation from the start
   to the greedy soup, selected on a held-out slice of train, never on val.
4. Evaluate ingredients, soups and their ensemble on val (each soup's selection-set figure is on its cook
   line); draw them (soups.png: matplotlib is a dependency of soup); write a submission.
5. Show that the shared start matters: a model of the same architecture from a random init fine-tuned on
   the same data; `soup inspect` says the starts differ, cooking refuses, and forcing it in gives a soup
   that collapses.
6. End on what was found: the best ingredient, the highest soup and the ensemble on val, and whether the
   greedy soup beats the best ingredient there beyond noise (paired interval, McNemar p).
Loops show transient progress bars on a terminal and leave one line each; a sweep's ingredients are named
by short ids (`00`) with their settings in a legend, so that the whole run reads in about two screens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from soup.cook.cooking import cook
from soup.cook.diagnose import pair_geometry, print_inspection
from soup.cook.best import candidate_methods
from soup.data.sketches import SHAPES, generate_sketches
from soup.errors import SoupError
from soup.judge.evaluate import eval_rows, evaluate_rows
from soup.judge.plot import draw
from soup.judge.report import add_statistics, default_reference, print_eval_table, top1_interval
from soup.ship.submit import predict_test, write_submission
from soup.models.checkpoint import find_checkpoints, read_checkpoint
from soup.models.files import write_text_atomic
from soup.models.runs import OUT_DIR, default_soup_file
from soup.models.starts import glyph_start
from soup.recipe.spec import recipe_from_dict
from soup.score.compare import describe_difference, p_value
from soup.score.evaluator import Evaluator
from soup.text import one_notice_each, short_names
from soup.train.sweep import train_recipe

CLASSES = list(SHAPES)  # none of them is one of the start's 600 glyphs


@dataclass(frozen=True)
class Size:
    train_per_class: int  # smudged pages the ingredients are fine-tuned on (a slice held out to select)
    val_per_class: int
    probe_epochs: int
    epochs: int
    trials: int  # finished draws; pruned ones are refilled, up to twice as many drawn


FULL = Size(150, 30, 30, 12, 6)
SMALL = Size(12, 4, 2, 2, 2)
FREEZE = 0.75
# Keys the training loop applies on the prefix cache (no augmentation: it would change the images before
# the frozen prefix). Freeze, lr band, epochs and pages a class were chosen on another draw of the data
# (seed 12, not the demo's 2): there 60 pages a class left fine-tunes within 3.5 points of the probe, 150
# lifted them 5-9 points above it (lr 1e-3 to 3e-3, 12 epochs; 6e-3 fell back).
SEARCH_SPACE = {
    "train.lr": {"loguniform": [1.5e-3, 4.5e-3]},
    "train.weight_decay": {"choice": [0.0, 0.01, 0.05]},
    "train.label_smoothing": {"uniform": [0.0, 0.1]},
    "train.seed": {"randint": [0, 999]},
}


def _recipe(name: str, root: Path, size: Size, **model) -> dict:
    start = glyph_start()
    return {
        "name": name,
        "data": {"root": str(root), "image_size": start.image_size, "holdout": 0.25},
        "model": start.model_section(freeze=FREEZE, **model),
        "train": {"epochs": size.epochs, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05,
                  "schedule": "cosine", "amp": "off", "num_workers": 0},
    }


def run_demo(out: str | Path = "soup_demo", console: Console | None = None, small: bool = False) -> dict:
    """Run the demo under `out`; returns the paths it wrote and the rows of its tables. Its trainings say
    once, not each time, that something optional (TensorBoard) is off."""
    with one_notice_each():
        return _run_demo(Path(out), console or Console(), small)


def _ingredients(out: Path, size: Size, console: Console) -> tuple[list, Path]:
    """Steps 1-2: the fine-tuning data, then a pruned random search from the probed shipped start."""
    start = glyph_start()
    console.rule("1. the shipped start and a shifted domain")
    console.print(f"start: the glyph ViT soup ships (DinoV2's architecture, {start.image_size} px), pretrained on "
                  f"600 procedural glyph classes; tuned on {len(CLASSES)} sketch shapes it never saw, "
                  f"{size.train_per_class} a class")
    target_root = out / "data"
    if not (target_root / "val_images").is_dir():
        generate_sketches(target_root, CLASSES, size.train_per_class, size.val_per_class, 40, seed=2,
                          distorted=True)
    console.rule("2. ingredients: fine-tuned from the probed start, drawn by random search")
    finetune = _recipe("sketch_soup", target_root, size,
                       probe={"epochs": size.probe_epochs, "lr": 3e-3, "optimizer": "adamw"})
    finetune["search"] = {"trials": size.trials, "seed": 0, "space": SEARCH_SPACE, "max_trials": 2 * size.trials,
                          "prune": {"rule": "start", "at": max(1, size.epochs // 2)}}
    # The rung is half-way: at a quarter (epoch 3 of 12) half the draws sat in a dip 1-3 points under the
    # probe, were pruned and refilled (1.25x the compute); said plainly, that was seen on the demo's own val.
    ckpts = out / OUT_DIR
    train_recipe(recipe_from_dict(finetune), ckpts, console=console, resume=True)
    # The draws pruning stopped stay on disk (cook leaves them out by their record): not ingredients here.
    drawn = find_checkpoints([ckpts / "sketch_soup"], kinds={"ingredient"})
    return [c for c in drawn if c.record.pruned is None], target_root


def _run_demo(out: Path, console: Console, small: bool) -> dict:
    size = SMALL if small else FULL

    # A rerun reuses what an earlier run of the same size finished (--resume); another size, or a demo
    # from before the shipped start or from another version of it (its ingredients have another start), would mix.
    marker = out / "demo.json"
    version = {"small": small, "ingredients": "search", "data": "distorted16",
               "start": f"glyph vit {glyph_start().sha256[:12]}"}
    if marker.exists() and json.loads(marker.read_text()) != version:
        raise SoupError(f"{out} holds a demo of another size or version; remove it or choose another --out")
    write_text_atomic(marker, json.dumps(version) + "\n")
    ingredients, target_root = _ingredients(out, size, console)
    ckpts = out / OUT_DIR

    console.rule("3. soups, selected on the held-out slice of train")
    # Every method that cooks from the ingredients alone (the registry's, as --best's candidates). A rerun
    # cooks its soups again (overwrite: they are the demo's own outputs, never an ingredient).
    # `soup cook`'s own lines for the greedy soup; the others in one table after it.
    quiet = Console(quiet=True)
    with console.status("cooking the other soups"):
        soups = {method: cook(method, ingredients, default_soup_file(method, ckpts), "holdout",
                              console=console if method == "greedy" else quiet, overwrite=True)
                 for method in candidate_methods()}
        # WiSE-FT from the starting weights (with the trained head) to the greedy soup, alpha chosen on holdout.
        soups["interpolate"] = cook("interpolate", [read_checkpoint(soups["greedy"])],
                                    default_soup_file("interpolate", ckpts), "holdout", console=quiet,
                                    options={"alpha": "0:1:0.25"}, overwrite=True)
    _soup_table(soups, console)

    console.rule("4. ingredients vs soups")
    everything = ingredients + [read_checkpoint(p) for p in soups.values()]
    tables = {}
    for split in ("holdout", "val"):
        evaluated = evaluate_rows(everything, Evaluator(split), ensemble=True)
        tables[split] = add_statistics(evaluated, compare=default_reference([r for r, _ in evaluated]))
    # Each soup's figure on the holdout slice that chose it is on its cook line above (optimistic); the
    # honest table is val's (`soup eval --split holdout` prints the other, and the demo returns it).
    print_eval_table(tables["val"], "val", console, title="accuracy on val: never used for training or selection")
    picture = _plot(tables["val"], read_checkpoint(soups["greedy"]), out / "soups.png", console)
    greedy = read_checkpoint(soups["greedy"])
    ids, categories = predict_test(greedy)
    submission = write_submission(out / "submission.csv", ids, categories, greedy.classes)

    forced_rows = _stranger(ingredients[0], target_root, size, ckpts, console)
    _summary(tables["val"], console)
    console.print(f"wrote {picture or 'no picture'} and {submission} (greedy soup, {len(ids)} images)")
    return {"soups": soups, "submission": submission, "tables": tables, "forced": forced_rows, "plot": picture}


def _stranger(ingredient, target_root: Path, size: Size, ckpts: Path, console: Console) -> list[dict]:
    """Step 5: the same ViT from a random init, fine-tuned on the same data, cannot be souped with an
    ingredient of the shipped start: inspect says so, cooking refuses, and forcing it collapses."""
    console.rule("5. soups need a shared start")
    # Two epochs: enough to leave its random start, and the demo's time goes to the ingredients.
    recipe = _recipe("stranger", target_root, replace(size, epochs=2), weights=None, init_seed=7)
    # Its set-up lines would repeat the ingredients' (same data path): one line says what it is.
    [(_, stranger)] = train_recipe(recipe_from_dict(recipe), ckpts, console=Console(quiet=True), resume=True)
    pair = [ingredient, read_checkpoint(stranger)]
    console.print(f"stranger/00: the same ViT from a random init, fine-tuned {recipe['train']['epochs']} epochs on "
                  f"the same pages: val {pair[1].record.val_acc:.2%}")
    print_inspection(pair_geometry(pair), console)
    try:
        cook("uniform", pair, ckpts / "stranger" / "refused.safetensors", None, console=console)
    except SoupError as err:  # the two files by their short names: the paths would take three lines
        labels = short_names(c.name for c in pair)
        said = str(err).replace(str(pair[0].path), labels[pair[0].name]).replace(str(pair[1].path), labels[pair[1].name])
        console.print(f"[yellow]refused, as it should be[/]: {escape(said)}")
    # Its warning says again what the refusal said: one line instead.
    forced = cook("uniform", pair, ckpts / "stranger" / "forced.safetensors", None, force=True,
                  console=Console(quiet=True), overwrite=True)
    console.print(f"averaged anyway with --force: {forced}")
    forced_rows = eval_rows(pair + [read_checkpoint(forced)], Evaluator("val"))
    print_eval_table(forced_rows, "val", console, title="a forced soup of two different starts, on val")
    return forced_rows


def _soup_table(soups: dict[str, Path], console: Console) -> None:
    """Every soup in one table: its members (with their weights where they differ) and its score on the
    selection set that chose it; `soup inspect SOUP` prints any soup's steps."""
    checkpoints = {method: read_checkpoint(path) for method, path in soups.items()}
    labels = short_names(member.name for c in checkpoints.values() for member in c.record.method.members)
    table = Table(title="the soups", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("soup", "holdout *", "members (weights where they differ)"):
        table.add_column(column, justify="right" if column == "holdout *" else "left")
    for method, checkpoint in checkpoints.items():
        record = checkpoint.record
        members, start = record.method.members, record.method.get("start_weight")
        same = max(m.weight for m in members) - min(m.weight for m in members) < 1e-6 and start is None
        said = ", ".join(labels[m.name] + ("" if same else f" {m.weight:.2f}") for m in members)
        said += f", start {start:.2f}" if start is not None else ""
        table.add_row(method, f"{record.selection.top1:.2%}", escape(said))
    console.print(table)
    console.print(f"* on the held-out slice that chose them: optimistic. Written to {soups['greedy'].parent}/.")


def _summary(rows: list[dict], console: Console) -> None:
    """What was learned, last: the best ingredient, the soup that scored highest and the ensemble on val (each
    against that ingredient), and the verdict on the greedy soup, the one chosen without val."""
    console.rule("what the demo found, on val (never used for training or selection)")
    labels = short_names(row["name"] for row in rows)
    best = max((row for row in rows if row["kind"] == "ingredient"), key=lambda row: row["top1"])
    soups = [row for row in rows if row["kind"] not in ("ingredient", "ensemble")]
    top = max(soups, key=lambda row: row["top1"])
    ensemble = next(row for row in rows if row["kind"] == "ensemble")
    console.print(f"best ingredient: {escape(best['name'].split('/', 1)[-1])}, {best['top1']:.2%} (95% CI "
                  f"{top1_interval(best)})")
    for what, row in ((f"highest soup: {escape(labels[top['name']])}", top), ("ensemble", ensemble)):
        compare = row.get("compare") or {}
        versus = (f", {describe_difference(compare, p=False)}, p={p_value(compare['p'])}"
                  if compare.get("diff") is not None else "")
        console.print(f"{what}, {row['top1']:.2%}{versus}")
    _verdict(rows, labels, console)


def _verdict(rows: list[dict], labels: dict, console: Console) -> None:
    """One line: does the greedy soup beat the best ingredient on val, which took no part in selection?"""
    greedy = next(row for row in rows if row["kind"] == "greedy")
    compare = greedy.get("compare") or {}
    if compare.get("diff") is None:
        return
    # Noise unless both agree: the paired interval excludes 0 and the exact McNemar p is under 0.05 (with few
    # disagreeing images the interval can exclude 0 while p, which is exact, does not).
    noise = (compare["low"] is None or compare["low"] <= 0 <= compare["high"]) or compare["p"] >= 0.05
    console.print(f"greedy soup vs the best ingredient on val ({escape(labels[compare['ref']])}): "
                  f"{describe_difference(compare)}: " +
                  ("a tie within noise (the interval holds 0 or p >= 0.05)" if noise else "a gain beyond noise" if compare["diff"] > 0
                   else "a loss beyond noise"))


def _plot(rows: list[dict], greedy, path: Path, console: Console) -> Path | None:
    steps = {"name": greedy.name, "steps": greedy.record.method.steps, "split": greedy.record.selection.split}
    try:
        draw(rows, steps, path)
    except SoupError as err:  # soup installed without its dependencies (no matplotlib): the rest still runs
        console.print(f"[yellow]no picture[/]: {escape(str(err))}")
        return None
    return path
