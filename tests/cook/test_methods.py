"""The soups that cost no extra training beyond uniform and greedy: learned, Model Stock, WiSE-FT interpolation."""

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from soup.cli import cli
from soup.cook import learned
from soup.cook.cooking import cook
from soup.cook.methods import METHODS, parse_alphas
from soup.cook.weights import starting_weights
from soup.errors import SoupError
from soup.models.backbones import build_model
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import CLASSES, state_close, tiny_recipe

quiet = Console(quiet=True)


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory, small_sketch_root):
    """Three tiny ResNet ingredients from one start (half frozen: identical prefix tensors)."""
    out = tmp_path_factory.mktemp("method_ingredients")
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, model={"freeze": 0.5},
                                          sweep={"train.seed": [0, 1, 2], }))
    return [read_checkpoint(train_ingredient(i, out, Console(quiet=True))) for i in expand_sweep(recipe)]


def copy_of(checkpoint, path):
    return read_checkpoint(save_checkpoint(path, checkpoint.state_dict(), checkpoint.meta))


def floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_registry_holds_every_method():
    assert {"uniform", "greedy", "learned", "stock", "interpolate"} <= set(METHODS)
    assert METHODS["learned"].needs_selection and not METHODS["stock"].needs_selection
    assert METHODS["interpolate"].takes_soups and not METHODS["greedy"].takes_soups


def test_learned_soup_of_one_ingredient_returns_it(ingredients, tmp_path):
    soup = read_checkpoint(cook("learned", ingredients[:1], tmp_path / "l.safetensors", "val", console=quiet))
    assert state_close(soup.state_dict(), ingredients[0].state_dict())
    assert soup.meta["coefficients"]["ingredients"] == [1.0] and soup.kind == "learned"


@pytest.mark.parametrize("per_layer", [False, True])
def test_learned_coefficients_sum_to_one_and_make_the_soup(ingredients, tmp_path, per_layer):
    # The mix itself, every tensor Σ cᵢθᵢ: the BatchNorm reset after it is tests/cook/test_batchnorm.py's.
    path = cook("learned", ingredients, tmp_path / "l.safetensors", "val", console=quiet,
                options={"per_layer": per_layer, "epochs": 2, "lr": 0.5}, bn_images=None)
    soup = read_checkpoint(path)
    record = soup.meta["coefficients"]
    assert sum(record["ingredients"]) == pytest.approx(1.0)
    assert len(record["ingredients"]) == len(ingredients) and all(c > 0 for c in record["ingredients"])
    # lr 0.5 for two epochs must move the coefficients off the uniform start
    assert max(abs(c - 1 / 3) for c in record["ingredients"]) > 1e-4
    states = [c.state_dict() for c in ingredients]
    state = soup.state_dict()
    layers = record.get("layers", {})
    assert bool(layers) == per_layer
    for key, value in floats(state).items():
        coefficients = layers.get(key, record["ingredients"])
        assert sum(coefficients) == pytest.approx(1.0)
        expected = sum(c * s[key] for c, s in zip(coefficients, states))
        assert torch.allclose(value, expected, atol=1e-5), key
    assert torch.equal(state["backbone.bn1.num_batches_tracked"], states[0]["backbone.bn1.num_batches_tracked"])
    assert [m["weight"] for m in soup.meta["members"]] == pytest.approx(record["ingredients"])
    assert len(soup.meta["steps"]) == 2 and soup.meta["selection"]["split"] == "val"


def test_learned_runs_enough_steps_on_a_small_selection_set(ingredients, tmp_path, small_sketch_root,
                                                           monkeypatch):
    # Without epochs asked for: 5 epochs, or more until MIN_STEPS AdamW steps (12 here, 100 by default).
    monkeypatch.setattr(learned, "MIN_STEPS", 12)
    images = len(list((Path(small_sketch_root) / "val_images").rglob("*.jpeg")))
    expected = max(5, math.ceil(12 / math.ceil(images / 32)))
    assert expected > 5  # the small set is what lengthens the fit, so this checks the rule
    soup = read_checkpoint(cook("learned", ingredients, tmp_path / "auto.safetensors", "val", console=quiet))
    assert soup.meta["coefficients"]["epochs"] == expected == len(soup.meta["steps"])
    asked = read_checkpoint(cook("learned", ingredients, tmp_path / "asked.safetensors", "val", console=quiet,
                                 options={"epochs": 3}))
    assert asked.meta["coefficients"]["epochs"] == 3 == len(asked.meta["steps"])
    for bad in (0, 2.5, True, "5"):
        with pytest.raises(SoupError, match="expected a whole number of epochs"):
            cook("learned", ingredients, tmp_path / "bad.safetensors", "val", console=quiet, options={"epochs": bad})
    assert not (tmp_path / "bad.safetensors").exists()


def test_learned_needs_data(ingredients, tmp_path):
    with pytest.raises(SoupError, match="learned soup needs held-out data"):
        cook("learned", ingredients, tmp_path / "l.safetensors", None, console=quiet)


def test_interpolation_endpoints_and_midpoint(ingredients, tmp_path):
    a, b = ingredients[:2]
    results = {}
    for alpha in (0, 0.5, 1):
        path = cook("interpolate", [a, b], tmp_path / f"i{alpha}.safetensors", None, console=quiet,
                    options={"alpha": str(alpha)})
        results[alpha] = read_checkpoint(path)
    assert state_close(results[0].state_dict(), a.state_dict())
    assert state_close(results[1].state_dict(), b.state_dict())
    sa, sb, mid = a.state_dict(), b.state_dict(), results[0.5].state_dict()
    for key, value in floats(mid).items():
        assert torch.allclose(value, (sa[key] + sb[key]) / 2, atol=1e-6), key
    assert results[0.5].meta["interpolation"]["alpha"] == 0.5
    assert [m["weight"] for m in results[0.5].meta["members"]] == [0.5, 0.5]


def test_interpolation_from_the_start_keeps_the_trained_head(ingredients, tmp_path):
    b = ingredients[1]
    soup = read_checkpoint(cook("interpolate", [b], tmp_path / "s.safetensors", None, console=quiet,
                                options={"alpha": "0"}))
    recipe = recipe_from_dict(b.recipe)
    start = build_model(recipe.model, CLASSES, recipe.data.image_size).state_dict()
    state, trained = soup.state_dict(), b.state_dict()
    assert not torch.equal(start["head.weight"], trained["head.weight"])
    for key, value in floats(state).items():
        expected = trained[key] if key.startswith("head.") else start[key]
        assert torch.equal(value, expected.float()), key
    assert soup.meta["start_weight"] == 1.0 and soup.meta["interpolation"]["a"] == "start"


def test_alpha_sweep_keeps_the_best(ingredients, tmp_path):
    soup = read_checkpoint(cook("interpolate", ingredients[:2], tmp_path / "s.safetensors", "val",
                                console=quiet, options={"alpha": "0:1:0.5"}))
    sweep = soup.meta["interpolation"]["sweep"]
    assert [s["alpha"] for s in sweep] == [0.0, 0.5, 1.0]
    best = max(sweep, key=lambda s: s["top1"])
    assert soup.meta["interpolation"]["alpha"] == best["alpha"]
    assert soup.meta["selection"]["top1"] == pytest.approx(best["top1"])
    with pytest.raises(SoupError, match="sweep needs held-out data"):
        cook("interpolate", ingredients[:2], tmp_path / "x.safetensors", None, console=quiet,
             options={"alpha": "0:1:0.5"})


def test_alpha_parsing():
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0:1:0.1")[-1] == 1.0 and len(parse_alphas("0:1:0.1")) == 11
    assert parse_alphas(0.3) == [0.3]
    for bad in ("x", "1:0:0.1", "0:1:0"):
        with pytest.raises(SoupError, match="--alpha"):
            parse_alphas(bad)


def test_stock_of_identical_ingredients_returns_them(ingredients, tmp_path):
    twins = [copy_of(ingredients[0], tmp_path / f"twin{i}" / "model.safetensors") for i in range(3)]
    soup = read_checkpoint(cook("stock", twins, tmp_path / "s.safetensors", None, console=quiet))
    assert state_close(soup.state_dict(), ingredients[0].state_dict(), atol=1e-6)


def test_stock_follows_the_paper_per_tensor(ingredients, tmp_path):
    pair = ingredients[:2]
    soup = read_checkpoint(cook("stock", pair, tmp_path / "s.safetensors", None, console=quiet))
    start = starting_weights(pair[0])
    a, b, state = pair[0].state_dict(), pair[1].state_dict(), soup.state_dict()
    checked = 0
    for key in floats(state):
        da, db = (a[key] - start[key]).flatten().double(), (b[key] - start[key]).flatten().double()
        if da.norm() == 0 or db.norm() == 0:
            assert torch.equal(state[key], start[key]), key  # frozen: stays at the start
            continue
        cos = max(0.0, float(da @ db / (da.norm() * db.norm())))
        t = 2 * cos / (1 + cos)  # Jang et al., eq. for k = 2
        expected = t * (a[key] + b[key]) / 2 + (1 - t) * start[key]
        assert torch.allclose(state[key], expected, atol=1e-5), key
        checked += 1
    assert checked > 0 and 0 < soup.meta["stock"]["mean_ratio"] <= 1


def test_start_that_no_longer_rebuilds_is_refused(ingredients, tmp_path):
    changed = {**ingredients[0].meta, "recipe": {**ingredients[0].recipe,
                                                 "model": {**ingredients[0].recipe["model"], "init_seed": 5}}}
    moved = [read_checkpoint(save_checkpoint(tmp_path / f"m{i}" / "model.safetensors", c.state_dict(), changed))
             for i, c in enumerate(ingredients[:2])]
    with pytest.raises(SoupError, match="rebuilds with fingerprint"):
        cook("stock", moved, tmp_path / "s.safetensors", None, console=quiet)


def test_options_of_another_method_are_refused(ingredients, tmp_path):
    with pytest.raises(SoupError, match="--alpha is not an option of the greedy soup; it goes with --interpolate"):
        cook("greedy", ingredients, tmp_path / "g.safetensors", "val", console=quiet, options={"alpha": "0.5"})


def test_cli_cooks_the_new_methods(ingredients, tmp_path):
    runner = CliRunner()
    a, b = (str(c.path) for c in ingredients[:2])
    out = tmp_path / "soups"
    result = runner.invoke(cli, ["cook", "--interpolate", a, b, "--alpha", "0:1:0.5", "-o", str(out / "i.safetensors")])
    assert result.exit_code == 0, result.output
    assert "best alpha" in result.output
    result = runner.invoke(cli, ["cook", "--stock", a, b, "--no-eval", "-o", str(out / "s.safetensors")])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(out / "s.safetensors").kind == "stock"
    result = runner.invoke(cli, ["cook", "--learned", "--per-layer", a, b, "-o", str(out / "l.safetensors")])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(out / "l.safetensors").meta["coefficients"]["per_layer"] is True
    # a soup can be an endpoint of an interpolation
    result = runner.invoke(cli, ["cook", "--interpolate", str(out / "s.safetensors"), "--alpha", "0.5", "--no-eval",
                                 "-o", str(out / "from_start.safetensors")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["cook", "--greedy", a, b, "--alpha", "0.5"])
    assert result.exit_code == 2 and "--alpha is not an option of the greedy soup" in result.output
    result = runner.invoke(cli, ["cook", "--stock", a, str(out / "s.safetensors"), "--no-eval"])
    assert result.exit_code == 2 and "not an ingredient" in result.output
