"""Issue 20, logs: TensorBoard event files per ingredient (figures equal to metrics.json's, hparams of a
search), summary.csv rebuilt as ingredients finish, the one-line notice without TensorBoard, train.log,
resume across a changed train.log, and what `soup cook` appends."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from soup.cook.cooking import cook
from soup.errors import Interrupted, SoupError
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import recipe_from_dict
from soup.train import logs, loop
from soup.train.sweep import train_recipe

from conftest import tiny_recipe

SPACE = {"train.lr": {"loguniform": [1e-3, 3e-3]}, "train.label_smoothing": {"choice": [0.0, 0.1]}}


def searched(root, trials=2, **sections):
    return recipe_from_dict(tiny_recipe(root, search={"trials": trials, "seed": 0, "space": SPACE}, **sections))


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def f32(value: float) -> float:
    return float(np.float32(value))  # TensorBoard stores scalars as float32


def test_events_hold_the_val_figures_of_metrics_json_and_the_settings_as_hparams(small_sketch_root, tmp_path):
    recipe = searched(small_sketch_root, train={"epochs": 2, "ema": 0.9})
    trained = train_recipe(recipe, tmp_path, console=Console(quiet=True))
    for ingredient, path in trained:
        metrics = json.loads((path.parent / "metrics.json").read_text())
        acc = events(path.parent)
        history = metrics["val_history"]
        for key, tag in [("val_top1", "val/top1"), ("val_loss", "val/nll"), ("raw_val_top1", "val/raw_top1"),
                         ("raw_val_loss", "val/raw_nll"), ("images_per_s", "speed/images_per_s"),
                         ("train_loss", "train/loss")]:
            assert [v for _, v in scalars(acc, tag)] == [f32(r[key]) for r in history], tag
        steps = [s for s, _ in scalars(acc, "val/top1")]
        assert steps[1] == 2 * steps[0] > 0  # one axis, optimizer steps: epoch 2 ends twice as far as epoch 1
        assert len(scalars(acc, "train/lr")) == 2
        assert scalars(acc, "hparams/val_top1")[-1][1] == f32(metrics["val_acc"])
        assert scalars(acc, "hparams/raw_val_top1")[-1][1] == f32(metrics["raw_val_acc"])
        start = plugin_data_pb2.HParamsPluginData.FromString(
            acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
        assert set(start.hparams) == set(ingredient.settings) == set(SPACE)
        assert start.hparams["train.lr"].number_value == ingredient.settings["train.lr"]
    # summary.csv: one row per ingredient, the drawn settings as columns, figures as metrics.json has them
    rows = list(csv.DictReader((tmp_path / "tiny" / "summary.csv").open()))
    assert list(rows[0]) == ["id", "train.label_smoothing", "train.lr", *logs.FIGURES]
    assert [r["id"] for r in rows] == sorted(i.id for i, _ in trained)
    for row, (ingredient, path) in zip(rows, sorted(trained, key=lambda t: t[0].id)):
        metrics = json.loads((path.parent / "metrics.json").read_text())
        assert float(row["val_acc"]) == metrics["val_acc"] and float(row["raw_val_acc"]) == metrics["raw_val_acc"]
        assert float(row["train.lr"]) == ingredient.settings["train.lr"] and int(row["epochs"]) == 2
        assert float(row["seconds"]) == pytest.approx(sum(r["seconds"] for r in metrics["val_history"]))
        assert float(row["images_per_s"]) > 0


def test_two_ingredient_runs_make_one_summary_and_cook_appends_its_choice(small_sketch_root, tmp_path):
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1]}))
    [(_, first)] = train_recipe(recipe, tmp_path, index=1, console=Console(quiet=True))
    folder = tmp_path / "tiny"
    assert [r["id"] for r in csv.DictReader((folder / "summary.csv").open())] == ["01-seed1"]
    [(_, second)] = train_recipe(recipe, tmp_path, index=0, console=Console(quiet=True))
    rows = list(csv.DictReader((folder / "summary.csv").open()))
    assert [(r["id"], r["train.seed"]) for r in rows] == [("00-seed0", "0"), ("01-seed1", "1")]
    assert not list(folder.glob(".*.tmp"))

    out = tmp_path / "soups" / "greedy.safetensors"
    before = {p: sorted(p.parent.iterdir()) for p in (first, second)}
    cook("greedy", [read_checkpoint(second), read_checkpoint(first)], out, console=Console(quiet=True))
    [row] = list(csv.DictReader((folder / "soups.csv").open()))
    meta = read_checkpoint(out).meta
    assert row["method"] == "greedy" and row["soup"] == str(out) and row["split"] == "val"
    assert float(row["selection_top1"]) == meta["selection"]["top1"]
    assert json.loads(row["steps"]) == meta["steps"]
    assert row["members"].split(";") == [m["name"] for m in meta["members"]]
    acc = events(folder / "soups")
    assert scalars(acc, "soups/greedy/selection_top1") == [(1, f32(meta["selection"]["top1"]))]
    # Nothing written into an ingredient's folder but by its own training.
    assert {p: sorted(p.parent.iterdir()) for p in (first, second)} == before


def test_without_tensorboard_one_line_says_so_and_training_goes_on(small_sketch_root, tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "SummaryWriter", None)
    console = Console(record=True, width=300)
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1]}))
    trained = train_recipe(recipe, tmp_path, console=console)
    lines = [line for line in console.export_text().splitlines() if "tensorboard" in line.lower()]
    assert lines == ["logs: TensorBoard is not installed, so no event files are written (summary.csv still is); "
                     "pip install 'soup[tensorboard]' turns them on"]
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert len(list(csv.DictReader((tmp_path / "tiny" / "summary.csv").open()))) == len(trained) == 2
    # cooking goes on quietly: the CSV, no events
    cook("uniform", [read_checkpoint(p) for _, p in trained], tmp_path / "u.safetensors", select_on=None,
         console=Console(quiet=True))
    assert (tmp_path / "tiny" / "soups.csv").exists() and not (tmp_path / "tiny" / "soups").exists()


def test_log_none_writes_no_events_and_no_notice(small_sketch_root, tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "SummaryWriter", None)
    console = Console(record=True, width=300)
    train_recipe(recipe_from_dict(tiny_recipe(small_sketch_root, train={"log": "none"})), tmp_path, console=console)
    assert "tensorboard" not in console.export_text().lower()
    monkeypatch.undo()
    train_recipe(recipe_from_dict(tiny_recipe(small_sketch_root, train={"log": "none"})), tmp_path / "b",
                 console=Console(quiet=True))
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert (tmp_path / "b" / "tiny" / "summary.csv").exists()


def test_bad_log_value_is_one_clear_error(tmp_path):
    with pytest.raises(SoupError, match=r"train.log: expected one of tensorboard, none, got 'tensorbord' "
                                        r"\(did you mean 'tensorboard'\?\)"):
        recipe_from_dict(tiny_recipe(tmp_path, train={"log": "tensorbord"}))


def test_resume_accepts_a_changed_log_and_appends_without_duplicates(small_sketch_root, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "CHECK_EVERY", 1)  # a read-back, so a train/loss point, after every step
    original = loop.train_epoch

    def killed_in_epoch_2(run, epoch, progress):
        record = original(run, epoch, progress)
        if epoch == 1:
            raise KeyboardInterrupt  # epoch 2 logged its steps, but its state was never saved
        return record

    monkeypatch.setattr(loop, "train_epoch", killed_in_epoch_2)
    recipe = tiny_recipe(small_sketch_root, train={"epochs": 2, "log": "tensorboard"})
    with pytest.raises(Interrupted):
        train_recipe(recipe_from_dict(recipe), tmp_path, console=Console(quiet=True))
    monkeypatch.setattr(loop, "train_epoch", original)
    # Another logging setting is not another version of the recipe: the saved state resumes.
    console = Console(record=True, width=300)
    [(_, path)] = train_recipe(recipe_from_dict(tiny_recipe(small_sketch_root, train={"epochs": 2, "log": "none"})),
                               tmp_path, console=console, resume=True)
    assert "resumed after epoch 1" in console.export_text()
    [(_, again)] = train_recipe(recipe_from_dict(recipe), tmp_path, console=console, resume=True)
    assert again == path and "finished already, skipped" in console.export_text()
    # and back to tensorboard: a resumed run appends, and TensorBoard drops what the killed run logged after
    # its saved state, so every step shows once
    with pytest.raises(Interrupted):
        monkeypatch.setattr(loop, "train_epoch", killed_in_epoch_2)
        train_recipe(recipe_from_dict(recipe), tmp_path / "b", console=Console(quiet=True))
    monkeypatch.setattr(loop, "train_epoch", original)
    [(_, path)] = train_recipe(recipe_from_dict(recipe), tmp_path / "b", console=Console(quiet=True), resume=True)
    acc = events(path.parent)
    steps = [s for s, _ in scalars(acc, "train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == steps[-1]  # one point per step, none twice
    history = json.loads((path.parent / "metrics.json").read_text())["val_history"]
    assert [v for _, v in scalars(acc, "val/top1")] == [f32(r["val_top1"]) for r in history]
    assert len(list(path.parent.glob("events.out.tfevents*"))) >= 2
