"""Hostile checkpoints and folders (issue 26): weights damaged into NaN, metadata edited with the right
top-level types but wrong nested values, a relative data root seen from another folder, an output deep
inside an ingredient's folder, and two studies' prefix stores on one data root."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from soup.cli import cli
from soup.fast import store as fast_store
from soup.models.checkpoint import METADATA_KEY, read_checkpoint

BUDGET_ENV = "SOUP_CACHE_BUDGET_GB"  # documented in docs/training.md

from conftest import CLASSES, ingredient_path, one_error_line, run_study, tiny_recipe, tiny_vit_model


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_sketch_root):
    """Two tiny ViT ingredients and their greedy soup, trained in <work> on a copy of the data at <work>/data
    named by the relative data.root `data`, as the shipped recipes name theirs."""
    work = tmp_path_factory.mktemp("hostile_meta")
    shutil.copytree(small_sketch_root, work / "data")
    recipe = tiny_recipe("data", model=tiny_vit_model(), data={"image_size": 28}, train={"batch_size": 8},
                         sweep={"train.seed": [0, 1]})
    run_study(work, recipe, ["cook", "--greedy", "checkpoints/tiny", "-o", "checkpoints/soups/greedy.safetensors"])
    return work


def greedy_path(work):
    return work / "checkpoints" / "soups" / "greedy.safetensors"


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edited_copy(source, target, edit=None, tensors=None):
    """A copy of checkpoint `source` at `target` with its soup metadata passed through `edit` and/or its
    tensors through `tensors`, written as safetensors writes it (nothing of soup's own checks the edit)."""
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(source))
    meta = json.loads(metadata[METADATA_KEY])
    if edit is not None:
        edit(meta)
    if tensors is not None:
        tensors(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata={METADATA_KEY: json.dumps(meta)})
    return target


def commands(edited, others, tmp_path):
    """Every command that reads a checkpoint for use, each given `edited` (with `others` where it takes
    several); `submit` and `calibrate` too."""
    paths = [str(edited), *map(str, others)]
    return {
        "eval": ["eval", *paths],
        "submit": ["submit", *paths[:1], "-o", str(tmp_path / "s.csv")],
        "export": ["export", str(edited), str(tmp_path / "exported")],
        "report": ["report", *paths, "-o", str(tmp_path / "r.html")],
        "plot": ["plot", *paths, "-o", str(tmp_path / "p.png")],
        "inspect": ["inspect", *paths],
        "calibrate": ["calibrate", str(edited)],
    }


# Item 1: weights that are not finite --------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_command_refuses_weights_damaged_into_nan(work, tmp_path, monkeypatch, value):
    monkeypatch.chdir(work)
    source = ingredient_path(work)
    damaged_key = sorted(k for k, v in load_file(str(source)).items() if v.is_floating_point())[3]

    def damage(state):
        state[damaged_key].view(-1)[0] = value

    damaged = edited_copy(source, tmp_path / "damaged" / "model.safetensors", tensors=damage)
    for name, args in commands(damaged, [ingredient_path(work, 1)], tmp_path).items():
        result = CliRunner().invoke(cli, args)
        one_error_line(result, str(damaged), f"tensor {damaged_key}", "NaN or infinite")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "exported").exists()
    assert read_checkpoint(damaged)  # the metadata itself is sound: the weights are what is refused


# Item 5: edited metadata ----------------------------------------------------------------------------------

def _set(path, value):
    """An edit setting the field at dotted `path` (list indices as numbers) to `value`."""
    def edit(meta):
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


INGREDIENT_EDITS = {
    "history value": (_set("val_history.0.val_top1", "high"), "val_history[0].val_top1"),
    "history entry": (_set("val_history", [[0.5]]), "val_history[0]"),
    "settings": (_set("settings", ["train.seed", 0]), "settings"),
    "probe": (_set("probe", {"id": "p", "val_acc": "0.9"}), "probe.val_acc"),
    "head of another shape": (_set("classes", [*CLASSES, "zebra"]), "classes"),
    "recipe backbone": (_set("recipe.model.backbone", "timm:vit_base_patch16_224"), "recipe.model.backbone"),
    "checkpoint_path": (_set("recipe.model.kwargs.checkpoint_path", "EVIL"), "recipe.model.kwargs.checkpoint_path"),
    "overlay file": (_set("recipe.model.kwargs.pretrained_cfg_overlay", {"file": "EVIL"}),
                     "recipe.model.kwargs.pretrained_cfg_overlay"),
}
SOUP_EDITS = {
    "greedy step top1": (_set("steps.0.top1", "0.5"), "steps[0].top1"),
    "greedy step kept": (_set("steps.0", {"candidate": "tiny/x", "top1": 0.5}), "steps[0].kept"),
    "greedy steps": (_set("steps", {"candidate": "tiny/x"}), "steps"),
    "member weight": (_set("members.0.weight", None), "members[0].weight"),
    "selection": (_set("selection", {"split": "val", "top1": [0.5]}), "selection.top1"),
}


@pytest.mark.parametrize("case", [*INGREDIENT_EDITS, *SOUP_EDITS])
def test_edited_metadata_is_one_line_naming_the_field_in_every_command(work, tmp_path, monkeypatch, case):
    monkeypatch.chdir(work)
    if case in INGREDIENT_EDITS:
        (edit, field), source, others = INGREDIENT_EDITS[case], ingredient_path(work), [ingredient_path(work, 1)]
    else:
        (edit, field), source, others = SOUP_EDITS[case], greedy_path(work), [ingredient_path(work, i) for i in (0, 1)]
    evil = tmp_path / "EVIL"  # what a recorded checkpoint_path would have timm unpickle
    evil.write_bytes(b"not to be opened")
    edited = edited_copy(source, tmp_path / "edited" / source.name, edit=_through(edit, str(evil)))
    for name, args in commands(edited, others, tmp_path).items():
        result = CliRunner().invoke(cli, args)
        one_error_line(result, str(edited), f"field {field}")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "exported").exists()


def _through(edit, evil):
    """`edit`, then its placeholder EVIL made the path of a real file (one timm would open)."""
    def apply(meta):
        edit(meta)
        meta.update(json.loads(json.dumps(meta).replace('"EVIL"', json.dumps(evil))))
    return apply


def test_a_metadata_edit_in_a_folder_skips_that_file_with_its_field(work, tmp_path, monkeypatch):
    folder = tmp_path / "study"
    shutil.copytree(work / "checkpoints" / "tiny", folder)
    [first, *_] = sorted(folder.glob("*/model.safetensors"))
    edited_copy(first, first, edit=_set("val_history", [[0.5]]))
    monkeypatch.chdir(work)
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "val_history[0]" in result.output and "skipped" in result.output


# Item 8: a relative data root seen from another folder ----------------------------------------------------

@pytest.mark.parametrize("recorded", [True, False])
def test_a_relative_data_root_is_guarded_from_any_folder(work, tmp_path, monkeypatch, recorded):
    data = work / "data"
    a, b = ingredient_path(work, 0), ingredient_path(work, 1)
    if not recorded:  # a file from before the record: found by the folder its checkpoints folder lies in
        drop = lambda meta: meta.pop("data_root", None)  # noqa: E731
        a = edited_copy(a, work / "older" / "tiny" / "a" / "model.safetensors", edit=drop)
        b = edited_copy(b, work / "older" / "tiny" / "b" / "model.safetensors", edit=drop)
    before = snapshot(data)
    monkeypatch.chdir(data / "train_images")  # where `data` names nothing: the guard must look where training did
    one_error_line(CliRunner().invoke(cli, ["export", str(a), "newclass"]), "newclass", "data root")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    soup = data / "train_images" / "circle" / "soup.safetensors"
    one_error_line(CliRunner().invoke(cli, ["cook", "--no-eval", str(a), str(b), "-o", str(soup)]), str(soup),
                   "data root")
    assert snapshot(data) == before and not (data / "train_images" / "newclass").exists()
    if recorded:  # where training found the relative root, as it resolved it
        assert read_checkpoint(a).meta["data_root"] == str(data.resolve())


# Item 12: every ancestor of an output is checked for an ingredient folder ---------------------------------

def test_outputs_deep_inside_an_ingredient_folder_are_refused(work, monkeypatch):
    monkeypatch.chdir(work)
    ingredient = ingredient_path(work)
    folder = ingredient.parent
    before = snapshot(folder)
    deep = folder / "a" / "b"
    one_error_line(CliRunner().invoke(cli, ["export", str(ingredient), str(deep)]), str(deep), "ingredient folder")
    soup = folder / "a" / "s.safetensors"
    one_error_line(CliRunner().invoke(cli, ["cook", "--no-eval", str(ingredient), str(ingredient_path(work, 1)),
                                            "-o", str(soup)]), str(soup), "ingredient folder")
    csv = folder / "a" / "b" / "s.csv"
    one_error_line(CliRunner().invoke(cli, ["submit", str(ingredient), "-o", str(csv)]), str(csv), "ingredient folder")
    assert snapshot(folder) == before and not (folder / "a").exists()


# Item 10: prefix stores of two studies on one data root -------------------------------------------------

def test_two_studies_keep_their_prefix_stores_on_one_data_root(tmp_path, small_sketch_root, monkeypatch,
                                                               fresh_caches):
    data = tmp_path / "data"
    shutil.copytree(small_sketch_root, data)
    monkeypatch.setenv("SOUP_FEATURE_STORE", "disk")
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    stores = {}
    for name, init_seed in (("first", 0), ("second", 1)):  # other starting weights: other prefix features
        recipe = tiny_recipe(data, name=name, model=tiny_vit_model(freeze=0.75, init_seed=init_seed),
                             data={"image_size": 28}, train={"batch_size": 8})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(cli, ["train", f"{name}.yaml"])
        assert result.exit_code == 0 and "memory map" in result.output, result.output
        stores[name] = set((data / ".soup_cache").glob("prefix-*.bin"))
    assert stores["first"] and stores["first"] < stores["second"]  # the first study's stores are all still there
    result = CliRunner().invoke(cli, ["train", "first.yaml", "--out", "again"])  # its stores read, not rebuilt
    assert result.exit_code == 0 and "(computed now)" not in result.output, result.output


def _store(folder, name, nbytes, mtime):
    path = folder / f"prefix-train_images-{name}.bin"
    array = fast_store.create_store(path, name, (nbytes,), np.uint8, lambda out: out.fill(7))
    del array
    os.utime(path, (mtime, mtime))
    return path


def test_stores_beyond_the_budget_go_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    old, middle, recent = (_store(tmp_path, name, 10_000, t) for name, t in (("a", 1e8), ("b", 2e8), ("c", 3e8)))
    assert fast_store.open_store(old, "a") is not None  # reading it makes it the most recently used
    size = old.stat().st_size
    monkeypatch.setenv(BUDGET_ENV, str(3 * size / fast_store.GB))  # room for three stores
    new = _store(tmp_path, "d", 10_000, 4e8)
    assert sorted(tmp_path.glob("*.bin")) == sorted([old, recent, new])  # b, the least recently used, went
    monkeypatch.setenv(BUDGET_ENV, "0")
    newest = fast_store.create_store(tmp_path / "prefix-val_images-e.bin", "e", (10,), np.uint8, lambda o: o.fill(1))
    del newest
    assert [p.name for p in tmp_path.glob("*.bin")] == ["prefix-val_images-e.bin"]  # the new one is never evicted


def test_what_train_and_cook_wrote_reads_back_as_written(work):
    """soup.models.records parses a real ingredient and soup and dumps them back key for key (issue 32)."""
    for path in (ingredient_path(work), ingredient_path(work, 1), greedy_path(work)):
        checkpoint = read_checkpoint(path)
        assert checkpoint.record.dump() == checkpoint.meta, path
