"""The issue-12 recipe keys: defaults keep today's behaviour, each is validated, each can be swept."""

import pytest
import yaml
from click.testing import CliRunner

from soup.cli import cli
from soup.errors import SoupError
from soup.recipe.spec import ProbeConfig, expand_sweep, recipe_from_dict

from conftest import tiny_recipe


def test_defaults_keep_todays_behaviour(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path))
    t = recipe.train
    assert (t.label_smoothing, t.schedule, t.warmup_epochs, t.min_lr) == (0.0, "step", 0.0, 0.0)
    assert (t.layer_decay, t.grad_clip, t.ema, t.mixup, t.cutmix) == (None, None, None, 0.0, 0.0)
    assert recipe.model.probe is None and recipe.search is None and recipe.data.augment == "none"


SWEEPS = {
    "train.label_smoothing": [0.0, 0.1],
    "train.schedule": ["step", "cosine"],
    "train.warmup_epochs": [0, 0.5],
    "train.min_lr": [0.0, 1e-5],
    "train.layer_decay": [None, 0.75, 1.0],
    "train.grad_clip": [None, 1.0],
    "train.ema": [None, 0.999],
    "train.mixup": [0.0, 0.8],
    "train.cutmix": [0.0, 1.0],
    "data.augment": ["none", "hflip", "crop_hflip", "randaugment", "trivialaugment", "autoaugment"],
    "model.probe": [None, {"epochs": 2, "lr": 1e-2}, {"epochs": 1, "lr": 0.1, "optimizer": "sgd", "batch_size": 8}],
}


@pytest.mark.parametrize("key", sorted(SWEEPS))
def test_each_new_key_is_sweepable(tmp_path, key):
    ingredients = expand_sweep(recipe_from_dict(tiny_recipe(tmp_path, train={"epochs": 2}, sweep={key: SWEEPS[key]})))
    section, name = key.split(".")
    got = [getattr(getattr(i.recipe, section), name) for i in ingredients]
    expected = [ProbeConfig(**v) if isinstance(v, dict) else v for v in SWEEPS[key]]
    assert got == expected


@pytest.mark.parametrize("section,values,message", [
    ("train", {"label_smoothing": 1.0}, r"train.label_smoothing must be in \[0, 1\)"),
    ("train", {"schedule": "linear"}, "train.schedule: expected one of step, cosine"),
    ("train", {"warmup_epochs": -0.5}, "train.warmup_epochs must be 0 or more"),
    ("train", {"warmup_epochs": 1}, "train.warmup_epochs must be less than train.epochs"),
    ("train", {"min_lr": -1e-5}, "train.min_lr must be 0 or more"),
    ("train", {"schedule": "cosine", "min_lr": 1.0}, "train.min_lr must be at most train.lr"),
    ("train", {"layer_decay": 0.0}, r"train.layer_decay must be in \(0, 1\] or null"),
    ("train", {"layer_decay": 1.5}, r"train.layer_decay must be in \(0, 1\] or null"),
    ("train", {"grad_clip": 0}, "train.grad_clip must be positive or null"),
    ("train", {"ema": 1.0}, r"train.ema must be a decay in \(0, 1\)"),
    ("train", {"mixup": -0.2}, "train.mixup must be 0 \\(off\\) or a positive alpha"),
    ("train", {"cutmix": -1}, "train.cutmix must be 0 \\(off\\) or a positive alpha"),
    ("data", {"augment": "randaug"}, r"data.augment: expected one of .*autoaugment, got 'randaug' \(did you mean "
                                     r"'randaugment'\?\)"),
    ("model", {"probe": {"epochs": 0, "lr": 1e-3}}, "model.probe.epochs must be at least 1"),
    ("model", {"probe": {"epochs": 2, "lr": 0}}, "model.probe.lr must be positive"),
    ("model", {"probe": {"epochs": 2, "lr": 1e-3, "batch_size": 0}}, "model.probe.batch_size must be at least 1"),
    ("model", {"probe": {"epochs": 2, "lr": 1e-3, "optimizer": "lbfgs"}}, "model.probe.optimizer: expected one of"),
    ("model", {"probe": {"epochs": 2, "lr": 1e-3, "epoch": 3}},
     r"unknown key 'model.probe.epoch' \(did you mean 'model.probe.epochs'\?\)"),
    ("model", {"probe": {"epochs": 2}}, "missing required key 'model.probe.lr'"),
    ("model", {"probe": 5}, "model.probe: expected a mapping or null, got 5"),
])
def test_bad_new_values_are_one_line_exit_2(tmp_path, section, values, message):
    data = tiny_recipe(tmp_path / "no_data_here", **{section: values})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    with pytest.raises(SoupError, match=message):
        recipe_from_dict(data)


def test_probe_round_trips_through_checkpoint_metadata(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, model={"probe": {"epochs": 3, "lr": 1e-2}}))
    again = recipe_from_dict(recipe.to_dict())  # what a checkpoint's metadata rebuilds
    assert again.model.probe == ProbeConfig(epochs=3, lr=1e-2, optimizer="adamw", batch_size=None)
    assert again.to_dict() == recipe.to_dict()


def test_combined_values_are_checked_per_ingredient(tmp_path):
    # Each swept value is valid alone; cosine with min_lr above the lr is not.
    recipe = recipe_from_dict(tiny_recipe(tmp_path, train={"lr": 1.0, "schedule": "cosine"},
                                          sweep={"train.lr": [1.0, 1e-3], "train.min_lr": [0.0, 1e-2]}))
    with pytest.raises(SoupError, match=r"ingredient 3 \(train.lr=0.001, train.min_lr=0.01\): train.min_lr must "
                                        "be at most train.lr"):
        expand_sweep(recipe)
