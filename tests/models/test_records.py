"""The checkpoint's records (issue 32): soup/models/records.py parses the metadata once at read and dumps
it once at write, in the JSON soup wrote before these types (files written before still read, and read
back as written); each record describes itself; the fields that went unchecked (pruned, bn_reset, start,
imported) are refused in one line when edited; a soup method's own fields are declared beside it; and
cook() itself leaves pruned draws out."""

import copy
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

import soup.cook.best  # noqa: F401  (declares --best's record)
import soup.cook.methods  # noqa: F401  (declares the methods' own records)
from soup.cook.cooking import cook
from soup.errors import SoupError
from soup.models.checkpoint import METADATA_KEY, read_checkpoint, save_checkpoint
from soup.models.records import UNKNOWN_START, BatchNormReset, Rung, Start, parse

RUNG = {"epoch": 1, "val_top1": 0.25, "threshold": 0.5, "rule": "median", "pruned": True, "peers": 3}
RECIPE = {"name": "pico", "model": {"backbone": "timm:pico"}, "data": {"root": "data"}}
COMMON = {"recipe": RECIPE, "backbone": "timm:pico", "classes": ["a", "b"]}

# The metadata each writer stored before the records existed, key for key (soup.train.loop.finish,
# soup.cook.cooking.save_soup, soup.outside.importing._meta at commit 8cc6fc6).
TRAINED = {"format": "soup/1", "kind": "ingredient", "name": "pico", "id": "lr=0.1", "settings": {"train.lr": 0.1},
           **COMMON, "data_root": "/data", "start_fingerprint": "f00d", "seed": 0,
           "val_history": [{"epoch": 0, "val_top1": 0.5, "train_loss": 1.0},
                           {"epoch": 1, "val_top1": 0.25, "train_loss": None, "rung": RUNG}],
           "val_acc": 0.25, "raw_val_acc": 0.25, "probe": {"id": "probe-1", "val_acc": 0.5}, "pruned": RUNG,
           "sweep_ids": ["lr=0.1", "lr=0.2"], "run": {"device": "cpu", "processes": 1}}
COOKED = {"format": "soup/1", "kind": "greedy", "name": "greedy", **COMMON, "data_root": "/data",
          "start_fingerprint": "f00d",
          "members": [{"name": "pico/lr=0.1", "path": "/c/pico/lr=0.1/model.safetensors", "weight": 1.0}],
          "candidates": ["pico/lr=0.1", "pico/lr=0.2"],
          "steps": [{"candidate": "pico/lr=0.1", "top1": 0.5, "kept": True}],
          "selection": {"split": "holdout", "root": None, "chose": True, "top1": 0.5, "top5": 1.0, "loss": 0.7,
                        "n": 20},
          "calibration": {"temperature": 1.5, "split": "holdout", "images": 20, "nll_before": 0.7,
                          "nll_after": 0.6, "ece_before": 0.1, "ece_after": 0.05},
          "versus_best": {"split": "val", "ref": "pico/lr=0.1", "diff": 0.01, "low": -0.02, "high": 0.04, "p": 0.5},
          "bn_reset": {"layers": ["bn1"], "of_layers": 2, "split": "train", "images": 64, "requested": 64, "seed": 0,
                       "batch_size": 32, "rule": "cumulative mean", "files": ["x.png"]}}
STOCK = {**COOKED, "kind": "stock", "name": "stock", "steps": [], "selection": None,
         "stock": {"mean_ratio": 0.5, "ratios": {"w": 0.5}, "cosines": {"w": 0.1}}}
IMPORTED = {"format": "soup/1", "kind": "ingredient", "name": "imported", "id": "a", "settings": {}, **COMMON,
            "start_fingerprint": UNKNOWN_START, "seed": None, "val_history": [], "probe": None, "sweep_ids": ["a"],
            "start": {"kind": "unknown", "start_check": "off"},
            "imported": {"source": "/x/a.pth", "file": "/x/a.pth", "sha256": "00", "format": "torch",
                         "weights": "whole file", "layout": "timm", "prefix": "", "left_out": [],
                         "architecture_from": "--model", "classes_reordered": False, "metric": None, "epoch": None,
                         "crop": None, "hub_id": "someone/model"}}


@pytest.mark.parametrize("written", [TRAINED, COOKED, STOCK], ids=["trained", "cooked", "stock"])
def test_a_file_written_before_reads_and_dumps_back_as_it_was(written):
    record = parse(Path("x.safetensors"), copy.deepcopy(written))
    assert record.dump() == written
    assert list(record.dump())[0] == "format"  # the version leads


def test_an_imported_ingredient_reads_with_its_start_unknown_and_dumps_a_superset():
    record = parse(Path("x.safetensors"), copy.deepcopy(IMPORTED))
    assert not record.start.known and record.start == Start.unknown()
    assert record.imported.hub_id == "someone/model" and record.pruned is None
    assert record.dump() == {**IMPORTED, "pruned": None}  # a null only, which every reader reads as not pruned


def test_records_are_typed_where_they_are_read():
    trained, cooked = parse(Path("t"), TRAINED), parse(Path("c"), COOKED)
    assert trained.pruned == Rung(**RUNG) and trained.probe.val_acc == 0.5 and trained.start.known
    assert trained.method is None and trained.members == []
    assert [m.weight for m in cooked.members] == [1.0] and cooked.method.candidates == COOKED["candidates"]
    assert cooked.selection.split == "holdout" and cooked.selection.chose_weights
    assert cooked.calibration.checked_temperature(Path("c")) == 1.5 and cooked.versus_best.diff == 0.01
    assert parse(Path("s"), STOCK).method.get("stock")["mean_ratio"] == 0.5


def test_a_file_from_before_the_pruned_field_takes_the_decision_its_epochs_recorded():
    old = {k: v for k, v in TRAINED.items() if k != "pruned"}
    assert parse(Path("x"), old).pruned == Rung(**RUNG)
    assert parse(Path("x"), {**old, "val_history": [{"epoch": 0, "val_top1": 0.5}]}).pruned is None


def test_records_describe_themselves():
    assert Rung(**RUNG).describe() == "pruned at epoch 1: val 25.00% below the median of its peers (50.00%)"
    reset = parse(Path("c"), COOKED).bn_reset
    assert reset.describe() == ("BatchNorm statistics: 1 of 2 layers re-estimated on 64 train images (seed 0, "
                                "batches of 32)")
    assert BatchNormReset(off=True, layers=[]).describe().endswith("not re-estimated (--no-bn-reset)")
    assert "kept as they are" in BatchNormReset(layers=[]).describe()
    assert reset.images_only() == {k: v for k, v in COOKED["bn_reset"].items() if k != "layers"}


@pytest.mark.parametrize("edit, field", [
    ({"pruned": {**RUNG, "epoch": "one"}}, "pruned.epoch"),
    ({"pruned": {**RUNG, "threshold": None}}, "pruned.threshold"),
    ({"pruned": ["epoch", 1]}, "pruned"),
    ({"bn_reset": {"layers": "bn1"}}, "bn_reset.layers"),
    ({"bn_reset": {"layers": [], "off": "yes"}}, "bn_reset.off"),
    ({"start": "pretrained"}, "start"),
    ({"imported": {"hub_id": ["a/b"]}}, "imported.hub_id"),
    ({"versus_best": {"diff": "0.1"}}, "versus_best.diff"),
    ({"calibration": {"temperature": 1.0, "ece_after": "low"}}, "calibration.ece_after"),
    ({"stock": {"mean_ratio": "high"}}, "stock.mean_ratio"),  # a method's own record, declared in soup.cook
    ({"best": {"candidates": {}}}, "best.winner"),
])
def test_an_edited_record_is_one_line_naming_its_field(edit, field):
    with pytest.raises(SoupError, match=rf"x.safetensors: soup metadata field {field} does not hold"):
        parse(Path("x.safetensors"), {**COOKED, **edit})


def test_the_one_writer_stores_the_dump(tmp_path):
    record = parse(Path("t"), TRAINED)
    path = save_checkpoint(tmp_path / "model.safetensors", {"w": torch.zeros(2, 1)}, record)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == TRAINED
    assert read_checkpoint(path).record == record


def _scalar(tmp_path, name, pruned):
    meta = {"kind": "ingredient", "name": "pico", "id": name, "recipe": {}, "backbone": "timm:pico",
            "classes": ["a"], "start_fingerprint": "same", "val_history": [], "pruned": RUNG if pruned else None}
    return read_checkpoint(save_checkpoint(tmp_path / name / "model.safetensors", {"w": torch.ones(1)}, meta))


def test_cook_itself_leaves_pruned_draws_out_unless_their_file_is_named(tmp_path):
    kept, pruned = _scalar(tmp_path, "kept", False), _scalar(tmp_path, "pruned", True)
    console = Console(record=True, width=200)
    soup = read_checkpoint(cook("uniform", [kept, pruned], tmp_path / "u.safetensors", None, console=console))
    assert [m.name for m in soup.record.members] == ["pico/kept"]
    assert "left out 1 pruned draw (pico/pruned)" in console.export_text()
    named = cook("uniform", [kept, pruned], tmp_path / "n.safetensors", None, console=console,
                 named=[pruned.path])
    written = read_checkpoint(named)
    assert [m.name for m in written.record.members] == ["pico/kept", "pico/pruned"]
    assert written.record.dump() == written.meta  # what cook wrote reads back as written
    assert "was pruned at epoch 1 (search.prune); cooking it because its file is named" in console.export_text()
