from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soup.cli import cli
from soup.errors import SoupError
from soup.recipe.spec import expand_sweep, load_recipe, recipe_from_dict
from soup.train.sweep import select_ingredients

from conftest import tiny_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", ["dinov2_f75.yaml", "swinv2_base.yaml", "tiny_cpu.yaml"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.name
    assert expand_sweep(recipe)


def test_reference_recipe_matches_the_course_recipe():
    recipe = load_recipe(RECIPES / "dinov2_f75.yaml")
    assert recipe.model.backbone == "hub:facebookresearch/dinov2:dinov2_vitb14"
    assert recipe.model.freeze == 0.75 and recipe.data.image_size == 224
    assert recipe.train.lr == 5e-3 and recipe.train.lr_drop_epoch == 7 and recipe.train.lr_drop_factor == 0.1
    assert recipe.train.epochs == 10 and recipe.train.amp == "fp16" and recipe.data.augment == "none"
    assert len(expand_sweep(recipe)) == 8


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_key_and_close_match(tmp_path):
    data = tiny_recipe(tmp_path)
    data["train"]["lrr"] = 0.1
    with pytest.raises(SoupError, match=r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_recipe(write(tmp_path, data))


def test_unknown_section(tmp_path):
    data = tiny_recipe(tmp_path)
    data["trian"] = {}
    with pytest.raises(SoupError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_recipe(write(tmp_path, data))


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "epochs", "ten", "train.epochs: expected an integer"),
    ("train", "lr", "fast", "train.lr: expected a number"),
    ("train", "amp", "fp8", "train.amp: expected one of fp16, bf16, off"),
    ("model", "freeze", 1.5, "model.freeze must be in"),
    ("model", "pretrained", "yes", "model.pretrained: expected true or false"),
    ("data", "mean", [0.5], "data.mean/data.std need three values"),
    ("model", "backbone", "resnet50", "model.backbone: cannot read 'resnet50'"),
])
def test_wrong_values(tmp_path, section, key, value, message):
    data = tiny_recipe(tmp_path)
    data[section][key] = value
    with pytest.raises(SoupError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_recipe(write(tmp_path, data))


def test_missing_required(tmp_path):
    data = tiny_recipe(tmp_path)
    del data["model"]["backbone"]
    with pytest.raises(SoupError, match="missing required key 'model.backbone'"):
        load_recipe(write(tmp_path, data))


def test_float_written_without_dot_is_a_number(tmp_path):
    text = write(tmp_path, tiny_recipe(tmp_path)).read_text() + ""
    path = tmp_path / "dotless.yaml"
    path.write_text(text.replace("lr: 0.002", "lr: 2e-3"))
    assert load_recipe(path).train.lr == 2e-3


def test_overrides_apply_and_are_validated(tmp_path):
    path = write(tmp_path, tiny_recipe(tmp_path))
    recipe = load_recipe(path, ["train.epochs=3", "train.lr=5e-4", "model.kwargs.img_size=224",
                                "model.weights=/x.pth"])
    assert recipe.train.epochs == 3 and recipe.train.lr == 5e-4
    assert recipe.model.kwargs == {"img_size": 224} and recipe.model.weights == "/x.pth"
    with pytest.raises(SoupError, match="unknown key 'train.epoch'"):
        load_recipe(path, ["train.epoch=3"])
    with pytest.raises(SoupError, match="write key.path=value"):
        load_recipe(path, ["train.epochs"])


def test_sweep_expansion_ids_and_values(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, sweep={"train.seed": [0, 1, 2], "train.lr": [5e-3, 2e-3]}))
    ingredients = expand_sweep(recipe)
    assert len(ingredients) == 6
    assert [i.recipe.train.seed for i in ingredients] == [0, 0, 1, 1, 2, 2]
    assert [i.recipe.train.lr for i in ingredients[:2]] == [5e-3, 2e-3]
    assert ingredients[3].id == "03-seed1-lr0.002"
    assert len({i.id for i in ingredients}) == 6
    assert all(i.recipe.sweep == {} for i in ingredients)  # resolved recipes carry their values, not the sweep
    assert [i.id for i in select_ingredients(recipe, 4)] == [ingredients[4].id]
    with pytest.raises(SoupError, match="--ingredient 6: the recipe's sweep has 6 ingredients"):
        select_ingredients(recipe, 6)


def test_bad_sweep_value_is_caught_at_load(tmp_path):
    with pytest.raises(SoupError, match=r"sweep.train.lr='high'"):
        recipe_from_dict(tiny_recipe(tmp_path, sweep={"train.lr": [1e-3, "high"]}))
    with pytest.raises(SoupError, match="unknown key 'train.sed'"):
        recipe_from_dict(tiny_recipe(tmp_path, sweep={"train.sed": [1, 2]}))


def test_cli_reports_recipe_error_in_one_line(tmp_path):
    data = tiny_recipe(tmp_path)
    data["train"]["optimiser"] = "sgd"
    result = CliRunner().invoke(cli, ["train", str(write(tmp_path, data))])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'train.optimiser'" in lines[0] and "train.optimizer" in lines[0]
    assert "Traceback" not in result.output


def test_cli_list_shows_each_ingredient(tmp_path):
    path = write(tmp_path, tiny_recipe(tmp_path, sweep={"train.seed": [0, 1]}))
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["0\t00-seed0\ttrain.seed=0", "1\t01-seed1\ttrain.seed=1"]


def test_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such file" in result.output
