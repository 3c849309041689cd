"""Random search (`search:`) and the issue-12 recipe keys: drawn reproducibly, validated at load, readable ids."""

import random
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soup.cli import cli
from soup.errors import SoupError
from soup.models.starts import glyph_start
from soup.recipe.search import MAX_INGREDIENTS, draw_trials
from soup.recipe.spec import expand_sweep, load_recipe, recipe_from_dict

from conftest import tiny_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

SPACE = {
    "train.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "train.weight_decay": {"choice": [0.0, 1.0e-4, 1.0e-3]},
    "train.label_smoothing": {"uniform": [0.0, 0.2]},
    "data.augment": {"choice": ["none", "randaugment", "trivialaugment"]},
    "train.seed": {"randint": [0, 1000]},
}


def searched(root, trials=4, seed=0, space=None, **sections):
    return tiny_recipe(root, search={"trials": trials, "seed": seed, "space": SPACE if space is None else space}, **sections)


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_search_draws_the_same_trials_whatever_the_key_order_or_global_rng(tmp_path):
    random.seed(1)
    first = expand_sweep(recipe_from_dict(searched(tmp_path)))
    random.seed(2)
    reordered = dict(reversed(list(SPACE.items())))
    again = expand_sweep(recipe_from_dict(searched(tmp_path, space=reordered)))
    assert [i.id for i in first] == [i.id for i in again] and [i.drawn for i in first] == [i.drawn for i in again]
    other_seed = expand_sweep(recipe_from_dict(searched(tmp_path, seed=1)))
    assert [i.drawn for i in other_seed] != [i.drawn for i in first]
    # Raising trials appends: the ingredients already trained keep their ids and values.
    more = expand_sweep(recipe_from_dict(searched(tmp_path, trials=6)))
    assert [i.id for i in more[:4]] == [i.id for i in first] and len(more) == 6


def test_search_ids_are_short_and_name_the_drawn_values(tmp_path):
    ingredients = expand_sweep(recipe_from_dict(searched(tmp_path)))
    item = ingredients[3]
    assert list(item.drawn) == sorted(SPACE)  # keys sorted, values recorded per ingredient
    assert item.settings == item.drawn
    lr = item.drawn["train.lr"]
    assert lr == float(f"{lr:.3g}")  # 3 significant digits: id, settings and recipe hold the same number
    assert re.fullmatch(r"03-aug(none|randaugment|trivialaugment)-ls[0-9.e-]+-lr[0-9.e-]+"
                        r"-seed\d+-wd[0-9.e-]+", item.id), item.id
    assert f"-lr{lr:g}-" in item.id and len(item.id) < 100
    assert item.recipe.train.lr == lr and item.recipe.data.augment == item.drawn["data.augment"]
    assert item.recipe.search is None and item.recipe.sweep == {}  # resolved: values, not the search
    assert len({i.id for i in ingredients}) == 4 and all(i.sweep_ids == [j.id for j in ingredients]
                                                         for i in ingredients)


def test_draws_cover_each_distribution_and_stay_in_range():
    space = {"a": {"loguniform": [1e-4, 1e-2]}, "b": {"uniform": [0.0, 0.2]}, "c": {"randint": [0, 2]},
             "d": {"choice": ["x", "y"]}, "e": {"loguniform": ["1e-3", "1e-3"]}}
    trials = draw_trials(space, 300, 7)
    assert draw_trials(space, 300, 7) == trials
    a = [t["a"] for t in trials]
    assert 1e-4 <= min(a) < 3e-4 and 3e-3 < max(a) <= 1e-2
    assert sum(x < 1e-3 for x in a) / 300 == pytest.approx(0.5, abs=0.1)  # log-uniform: half below the middle
    assert all(0.0 <= t["b"] <= 0.2 for t in trials)
    assert {t["c"] for t in trials} == {0, 1, 2} and {t["d"] for t in trials} == {"x", "y"}
    assert {t["e"] for t in trials} == {1e-3}


def test_grid_times_search_is_trial_major(tmp_path):
    recipe = recipe_from_dict(searched(tmp_path, trials=3, sweep={"train.optimizer": ["sgd", "adamw"]}))
    ingredients = expand_sweep(recipe)
    assert len(ingredients) == 6
    assert [i.recipe.train.optimizer for i in ingredients] == ["sgd", "adamw"] * 3
    assert ingredients[0].drawn == ingredients[1].drawn != ingredients[2].drawn
    assert ingredients[1].id.startswith("01-optadamw-aug")
    assert ingredients[1].settings == {"train.optimizer": "adamw", **ingredients[1].drawn}


@pytest.mark.parametrize("space,message", [
    ({"train.lr": {"logunifrom": [1e-4, 1e-2]}},
     r"search.space.train.lr: unknown distribution 'logunifrom' \(did you mean 'loguniform'\?\)"),
    ({"train.lr": {"uniform": [1e-2, 1e-4]}}, "search.space.train.lr: uniform low 0.01 is above high 0.0001"),
    ({"train.lr": {"loguniform": [0, 1e-2]}}, "search.space.train.lr: loguniform needs 0 < low"),
    ({"train.seed": {"randint": [0.5, 3]}}, r"search.space.train.seed: randint needs \[low, high\] \(integers\)"),
    ({"train.lr": 0.1}, "search.space.train.lr: expected one distribution"),
    ({"data.augment": {"choice": ["none", "randaugmnt"]}},
     r"search.space.data.augment: choice 'randaugmnt': data.augment: expected one of .* \(did you mean "
     r"'randaugment'\?\)"),
    ({"data.augment": {"choice": []}}, "search.space.data.augment: choice needs a non-empty list"),
    ({"train.lrr": {"uniform": [1e-4, 1e-2]}}, r"search.space.train.lrr: low 0.0001: unknown key 'train.lrr' "
                                               r"\(did you mean 'train.lr'\?\)"),
    ({"train.label_smoothing": {"uniform": [0.0, 1.0]}},
     r"search.space.train.label_smoothing: high 1.0: train.label_smoothing must be in \[0, 1\)"),
    ({"sweep.train.lr": {"choice": [[1e-3]]}}, "a search cannot set the sweep or the search itself"),
    ({}, "search.space: expected a mapping"),
])
def test_bad_search_is_one_line_and_exit_2_before_any_data(tmp_path, space, message):
    # data.root does not exist: the search is refused before anything looks at data.
    data = searched(tmp_path / "no_data_here", space=space)
    result = CliRunner().invoke(cli, ["train", str(write(tmp_path, data)), "--list"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert re.search(message, lines[0]), lines[0]


def test_drawn_trials_are_validated_together(tmp_path):
    # Every end is fine alone (train.lr is 1.0 in the file); some drawn pairs have min_lr above lr.
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.min_lr": {"uniform": [0.0, 1e-2]}}
    data = searched(tmp_path, trials=8, space=space, train={"lr": 1.0, "schedule": "cosine"})
    with pytest.raises(SoupError, match=r"search trial \d \(train.lr=.*, train.min_lr=.*\): train.min_lr must "
                                        r"be at most train.lr"):
        recipe_from_dict(data)


def test_search_and_sweep_of_one_key_and_too_many_trials_are_refused(tmp_path):
    with pytest.raises(SoupError, match="search.space.train.lr: also in sweep:"):
        recipe_from_dict(searched(tmp_path, sweep={"train.lr": [1e-3]}))
    with pytest.raises(SoupError, match=f"= {2 * 600} ingredients; at most {MAX_INGREDIENTS} per recipe"):
        recipe_from_dict(searched(tmp_path, trials=600, sweep={"train.seed": [0, 1]}))
    with pytest.raises(SoupError, match="search.trials must be at least 1"):
        recipe_from_dict(searched(tmp_path, trials=0))
    with pytest.raises(SoupError, match="unknown key 'search.trails'"):
        recipe_from_dict(tiny_recipe(tmp_path, search={"trails": 3, "space": SPACE}))
    with pytest.raises(SoupError, match="sweep.search.trials: a sweep cannot sweep itself or the search"):
        recipe_from_dict(searched(tmp_path, sweep={"search.trials": [1, 2]}))


def test_cli_list_and_one_ingredient_of_a_search(tmp_path):
    path = write(tmp_path, searched(tmp_path, trials=3))
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert result.exit_code == 0, result.output
    ingredients = expand_sweep(load_recipe(path))
    assert result.output.splitlines() == [
        f"{i.index}\t{i.id}\t" + ", ".join(f"{k}={v}" for k, v in i.settings.items()) for i in ingredients]
    one = CliRunner().invoke(cli, ["train", str(path), "--list", "--ingredient", "2"])
    assert one.output.splitlines() == result.output.splitlines()[2:]


@pytest.mark.parametrize("name,trials", [("dinov2_search.yaml", 16), ("tiny_search.yaml", 16)])
def test_shipped_search_recipes_load_and_list(name, trials, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)  # tiny_search's start is named from soup's source tree
    recipe = load_recipe(RECIPES / name)
    assert recipe.search.trials == trials and recipe.model.probe is not None
    assert set(recipe.search.space) >= {"train.lr", "train.weight_decay", "train.label_smoothing", "train.seed"}
    ingredients = expand_sweep(recipe)
    drawn = recipe.search.max_trials or trials  # a pruned search lists every draw it may try
    assert len(ingredients) == drawn and len({i.recipe.train.lr for i in ingredients}) > drawn // 2
    assert recipe.search.prune is not None and recipe.search.prune.rule == "start"
    result = CliRunner().invoke(cli, ["train", str(RECIPES / name), "--list"])
    assert result.exit_code == 0 and len(result.output.splitlines()) == drawn


def test_tiny_search_starts_from_the_shipped_start(monkeypatch):
    """The CPU search recipe fine-tunes the start soup ships, with the architecture its weights fit."""
    monkeypatch.chdir(RECIPES.parent)
    recipe, start = load_recipe(RECIPES / "tiny_search.yaml"), glyph_start()
    assert Path(recipe.model.weights).resolve() == start.weights and recipe.model.kwargs == start.kwargs
    assert f"{recipe.model.backbone}" == start.backbone and recipe.data.image_size == start.image_size
