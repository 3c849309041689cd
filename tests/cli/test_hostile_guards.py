"""Hostile inputs from issue 31 outside import's own code: absurd normalisation (recipes and imports share one
check), NaN logits at evaluation, the NaN stop's advice, an endless train.epochs, and cooks racing to one
output."""

import argparse
import errno
import os
import shutil
import threading

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from rich.console import Console
from timm.utils import CheckpointSaver

import soup.cook.cooking
from soup.cli import cli
from soup.cook.cooking import cook as cook_soup
from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint, save_checkpoint

from conftest import CLASSES, ingredient_path, one_error_line, run_study, tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_sketch_root):
    """Two tiny ResNet ingredients (BatchNorm everywhere) of one start under <work>/checkpoints/tiny/."""
    work = tmp_path_factory.mktemp("hostile_guards")
    shutil.copytree(small_sketch_root, work / "data")
    run_study(work, tiny_recipe(work / "data", sweep={"train.seed": [0, 1]}))
    return work


def invoke(work, *args):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        return CliRunner().invoke(cli, [str(a) for a in args])


def write_recipe(folder, root, **sections) -> str:
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(root, **sections)))
    return str(path)


def edited_copy(trained, path, change) -> str:
    """A copy of the first ingredient with `change(state)` applied to its tensors."""
    source = read_checkpoint(ingredient_path(trained))
    state = source.state_dict()
    change(state)
    save_checkpoint(path, state, source.meta)
    return str(path)


# E. Normalisation in a sane range, finite: one check for recipes and imports ------------------------------

@pytest.mark.parametrize("data,message", [
    ({"mean": [1e308, 0.4, 0.4], "std": [1e-320, 0.2, 0.2]}, "data.mean must be finite numbers from -10 to 10"),
    ({"std": [1e-320, 0.2, 0.2]}, "data.std must be finite numbers from 0.001 to 10"),
    ({"std": [0.2, 1e6, 0.2]}, "data.std must be finite numbers from 0.001 to 10"),
    ({"mean": [123.7, 116.8, 103.9]}, "data.mean must be finite numbers from -10 to 10"),  # a 0-255 figure
    ({"mean": [float("nan"), 0.4, 0.4]}, "data.mean must be"),
    ({"std": [0.2, float("inf"), 0.2]}, "data.std must be"),
])
def test_absurd_normalisation_is_one_line_at_load(tmp_path, small_sketch_root, data, message):
    result = CliRunner().invoke(cli, ["train", write_recipe(tmp_path, small_sketch_root, data=data), "--list"])
    one_error_line(result, message, "scaled to [0, 1]")


@pytest.mark.parametrize("data", [{"mean": [0.5] * 3, "std": [0.5] * 3}, {"mean": [0.0] * 3, "std": [1.0] * 3},
                                  {"mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}])
def test_published_normalisations_are_accepted(tmp_path, small_sketch_root, data):
    result = CliRunner().invoke(cli, ["train", write_recipe(tmp_path, small_sketch_root, data=data), "--list"])
    assert result.exit_code == 0, result.output


def test_an_imported_source_with_absurd_normalisation_goes_through_the_same_check(small_sketch_root, tmp_path):
    """timm's train.py records its --mean/--std in the checkpoint's args: import builds its recipe from them
    through the recipe check, so the same line refuses them and nothing is written."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(CLASSES))
    args = argparse.Namespace(model="test_resnet", num_classes=len(CLASSES), input_size=None, img_size=32,
                              mean=[1e308, 0.4, 0.4], std=[1e-320, 0.2, 0.2], model_kwargs={})
    CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                    checkpoint_dir=str(tmp_path)).save_checkpoint(0)
    result = invoke(tmp_path, "import", "checkpoint-0.pth.tar", "--data", small_sketch_root)
    one_error_line(result, "data.mean must be finite numbers from -10 to 10")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("key,value", [("mean", [1e308, 0.4, 0.4]), ("std", [1e-320, 0.2, 0.2]),
                                       ("std", ["0.2", 0.2, 0.2])])
def test_a_checkpoint_recording_absurd_normalisation_is_refused_naming_it(trained, tmp_path, key, value):
    """A recorded recipe is data: an edited mean/std meets the recipe's own check where the file is read."""
    source = read_checkpoint(ingredient_path(trained))
    recipe = {**source.recipe, "data": {**source.recipe["data"], key: value}}
    path = tmp_path / "edited.safetensors"
    save_checkpoint(path, source.state_dict(), {**source.meta, "recipe": recipe})
    for args in (["eval", path], ["inspect", path], ["cook", path, ingredient_path(trained, 1), "-o",
                                                    tmp_path / "s.safetensors"]):
        one_error_line(invoke(trained, *args), str(path), f"recipe.data.{key}")
    assert not (tmp_path / "s.safetensors").exists()


def negative_var(state):
    key = [k for k in state if k.endswith("running_var")][-1]  # the last BatchNorm: every logit goes NaN
    state[key] = -state[key].abs() - 1.0


def test_nan_logits_are_an_error_naming_the_checkpoint_never_a_nan_figure(trained, tmp_path):
    path = edited_copy(trained, tmp_path / "negative.safetensors", negative_var)
    for args in (["eval", path, "--json"], ["eval", path, "--no-cache", "--json"],
                 ["eval", path, "--tta", "flip", "--json"], ["calibrate", path],
                 ["submit", path, "-o", tmp_path / "s.csv"]):
        one_error_line(invoke(trained, *args), path, "NaN or infinite logits", "running_var below zero")
    assert not (tmp_path / "s.csv").exists()
    # Greedy cooking scores each ingredient alone first: the line names that ingredient, not the template.
    good = ingredient_path(trained, 1)
    result = invoke(trained, "cook", "--greedy", good, path, "-o", tmp_path / "g.safetensors")
    one_error_line(result, path, "NaN or infinite logits")
    assert not (tmp_path / "g.safetensors").exists()


def test_a_nan_loss_before_any_update_does_not_blame_the_lr(trained, tmp_path):
    """Start weights whose head overflows float32: the loss is NaN at the first step, before the lr touched
    anything, so the line points at the inputs and the start weights."""
    start = edited_copy(trained, tmp_path / "huge.safetensors",
                        lambda state: state["head.weight"].fill_(1e38))
    recipe = write_recipe(tmp_path, trained / "data", model={"weights": start})
    result = invoke(tmp_path, "train", recipe)
    one_error_line(result, "loss became nan at epoch 1, step 1", "train.lr is not the cause", "data.mean/data.std",
                   "model.weights")
    assert "lower train.lr" not in result.stderr


# M. train.epochs capped like a sweep's ingredients ---------------------------------------------------------

@pytest.mark.parametrize("key", ["train.epochs", "model.probe.epochs"])
def test_an_endless_epoch_count_is_one_line(tmp_path, small_sketch_root, key):
    recipe = write_recipe(tmp_path, small_sketch_root, model={"probe": {"epochs": 1, "lr": 0.01}})
    result = CliRunner().invoke(cli, ["train", recipe, "--list", "--set", f"{key}={10**23}"])
    one_error_line(result, f"{key} must be at least 1 and at most 10,000")
    ok = CliRunner().invoke(cli, ["train", recipe, "--list", "--set", f"{key}=10000"])
    assert ok.exit_code == 0, ok.output


# L. Cooks racing to one new output: the final step never replaces a file that appeared meanwhile -----------

def pause_before_writing(monkeypatch, before):
    """Run `before()` between cooking's output check and its final write (where a racing cook lands)."""
    real = soup.cook.cooking.save_checkpoint

    def paused(*args, **kwargs):
        before()
        return real(*args, **kwargs)

    monkeypatch.setattr(soup.cook.cooking, "save_checkpoint", paused)


def no_hard_links(*args, **kwargs):
    raise PermissionError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_four_cooks_racing_to_one_new_output_one_wins(trained, tmp_path, monkeypatch, links):
    """Four cooks pass the exists check together, then all write: one soup lands, three fail, none replaced;
    on a file system without hard links too (an exclusive create claims the name)."""
    if not links:
        monkeypatch.setattr(os, "link", no_hard_links)
    barrier = threading.Barrier(4)
    pause_before_writing(monkeypatch, lambda: barrier.wait(timeout=120))
    ingredients = [read_checkpoint(ingredient_path(trained, i)) for i in (0, 1)]
    out = tmp_path / "soups" / "uniform.safetensors"
    outcomes = []

    def one_cook():
        try:
            cook_soup("uniform", ingredients, out, None, console=Console(quiet=True))
            outcomes.append("wrote")
        except SoupError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=one_cook) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert outcomes.count("wrote") == 1, outcomes
    assert all("exists: another command wrote it while this one ran" in o for o in outcomes if o != "wrote")
    assert read_checkpoint(out).kind == "uniform"
    assert sorted(p.name for p in out.parent.iterdir()) == ["uniform.safetensors"]  # no temporary file left


def test_an_output_that_appears_while_cooking_is_left_alone_unless_overwrite(trained, tmp_path, monkeypatch):
    out = tmp_path / "soup.safetensors"
    pause_before_writing(monkeypatch, lambda: out.write_bytes(b"another cook's soup"))
    args = ["cook", "--uniform", "--no-eval", ingredient_path(trained, 0), ingredient_path(trained, 1), "-o", out]
    one_error_line(invoke(trained, *args), str(out), "exists", "--overwrite")
    assert out.read_bytes() == b"another cook's soup"
    out.unlink()
    result = invoke(trained, *args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_checkpoint(out).kind == "uniform"
