"""The learned soup on the frozen-prefix cache, its logit scale β and its hyperplane form (issue 19)."""

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import soup.cook.learned as learned
from soup.cli import cli
from soup.cook.cooking import cook
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import plain_scores, tiny_recipe, tiny_vit_model

quiet = Console(quiet=True)


@pytest.fixture(scope="module")
def vit_ingredients(tmp_path_factory, small_sketch_root):
    """Three tiny DinoV2-architecture ViT ingredients of one start, first 2 of 4 blocks frozen (a shared
    prefix), with a holdout slice of train to fit on."""
    out = tmp_path_factory.mktemp("learned_ingredients")
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.75),
                                          data={"image_size": 28, "holdout": 0.3},
                                          train={"batch_size": 8, "lr": 5e-3}, sweep={"train.seed": [0, 1, 2]}))
    return [read_checkpoint(train_ingredient(i, out, Console(quiet=True))) for i in expand_sweep(recipe)]


def counting_prefix_calls(monkeypatch) -> dict:
    """Counts forward calls of the cached prefix's modules and of the last block while fitting."""
    calls = {"prefix": 0, "suffix": 0}
    real = learned.fitting

    def counted(select, shared, batch_size):
        fit = real(select, shared, batch_size)
        split = select.cached.split

        def count(part):
            return lambda *_: calls.__setitem__(part, calls[part] + 1)
        for module in split.prefix_modules():
            module.register_forward_hook(count("prefix"))
        split.blocks[-1].register_forward_hook(count("suffix"))
        return fit
    monkeypatch.setattr(learned, "fitting", counted)
    return calls


def mixed_by_hand(ingredients, coefficients) -> dict:
    states = [c.state_dict() for c in ingredients]
    return {key: sum(c * s[key].double() for c, s in zip(coefficients, states)).float()
            for key in states[0] if states[0][key].is_floating_point()}


def test_cached_and_full_paths_fit_the_same_coefficients(vit_ingredients, tmp_path, monkeypatch, fresh_caches):
    options = {"epochs": 2, "lr": 0.5}
    calls = counting_prefix_calls(monkeypatch)
    cached = read_checkpoint(cook("learned", vit_ingredients, tmp_path / "cached.safetensors", "val",
                                  console=quiet, options=options))
    assert calls["prefix"] == 0 and calls["suffix"] > 0  # fitting and scoring ran the suffix only
    assert cached.meta["coefficients"]["fitted_on"].startswith("prefix cache (2 blocks)")
    calls.update(prefix=0, suffix=0)
    with monkeypatch.context() as patch:
        patch.setattr(learned, "cached_prefix", lambda select, shared: None)
        full = read_checkpoint(cook("learned", vit_ingredients, tmp_path / "full.safetensors", "val",
                                    console=quiet, options=options))
    assert calls["prefix"] > 0 and full.meta["coefficients"]["fitted_on"].startswith("the whole model")
    a, b = cached.meta["coefficients"], full.meta["coefficients"]
    assert max(abs(x - 1 / 3) for x in a["ingredients"]) > 1e-3  # it moved, so agreeing means something
    assert a["ingredients"] == pytest.approx(b["ingredients"], abs=1e-5)
    assert a["logit_scale"] != 1.0 and a["logit_scale"] == pytest.approx(b["logit_scale"], abs=1e-5)
    full_state = full.state_dict()
    for key, value in cached.state_dict().items():
        assert torch.allclose(value.float(), full_state[key].float(), atol=1e-5), key


def test_learned_soup_on_the_cache_is_its_coefficients_mix(vit_ingredients, tmp_path):
    out = tmp_path / "learned.safetensors"
    result = CliRunner().invoke(cli, ["cook", "--learned", *(str(c.path) for c in vit_ingredients), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "through prefix cache (2 blocks), suffix only" in result.output
    soup = read_checkpoint(out)
    record = soup.meta["coefficients"]
    assert sum(record["ingredients"]) == pytest.approx(1.0) and all(c > 0 for c in record["ingredients"])
    # The tiny val set is one batch, so the default fit runs its minimum of 100 steps: 100 epochs.
    assert record["logit_scale"] > 0 and len(soup.meta["steps"]) == record["epochs"] == 100
    state, expected = soup.state_dict(), mixed_by_hand(vit_ingredients, record["ingredients"])
    for key, value in expected.items():
        assert torch.allclose(state[key], value, atol=1e-6), key
    # The frozen prefix stays the start's bit for bit, and the recorded figure is the saved weights' own.
    assert torch.equal(state["backbone.blocks.0.attn.qkv.weight"],
                       vit_ingredients[0].state_dict()["backbone.blocks.0.attn.qkv.weight"])
    plain = plain_scores(soup, split="val")
    assert {k: soup.meta["selection"][k] for k in plain} == plain


def test_hyperplane_soup_by_hand(vit_ingredients, tmp_path, monkeypatch):
    read = []
    real_read = learned._read
    monkeypatch.setattr(learned, "_read", lambda ings, keys, device: read.append(len(ings)) or real_read(ings, keys, device))
    out = tmp_path / "hyper.safetensors"
    result = CliRunner().invoke(cli, ["cook", "--learned", "--hyperplane", "--bound", "0.3", "--select-on", "holdout",
                                      *(str(c.path) for c in vit_ingredients), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "not an honest test" not in result.output and "on val (not used in fitting)" in result.output
    soup = read_checkpoint(out)
    record = soup.meta["coefficients"]
    weights = record["ingredients"]
    assert record["hyperplane"] and record["bound"] == 0.3 and record["logit_scale"] > 0
    assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    assert all(-0.3 - 1e-9 <= c <= 1.3 + 1e-9 for c in weights) and max(abs(c - 1 / 3) for c in weights) > 1e-3
    # Device memory flat in N: a block of 2 read at once, the others mixed one ingredient at a time.
    assert read and max(read) == 2 and min(read) == 1
    state, expected = soup.state_dict(), mixed_by_hand(vit_ingredients, weights)
    for key, value in expected.items():
        assert torch.allclose(state[key], value, atol=1e-6), key
    holdout, val = plain_scores(soup, split="holdout"), plain_scores(soup, split="val")
    assert {k: soup.meta["selection"][k] for k in holdout} == holdout and soup.meta["selection"]["split"] == "holdout"
    assert {k: soup.meta["reported"][k] for k in val} == val and soup.meta["reported"]["split"] == "val"


def test_hyperplane_on_val_warns_and_options_are_checked(vit_ingredients, tmp_path):
    runner, paths = CliRunner(), [str(c.path) for c in vit_ingredients[:2]]
    result = runner.invoke(cli, ["cook", "--learned", "--hyperplane", *paths, "-o", str(tmp_path / "h.safetensors")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "val then is not an honest test" in line]
    assert len(warnings) == 1 and "--select-on holdout" in warnings[0]
    for args, message in ((["--learned", "--bound", "0.3"], "add --hyperplane"),
                          (["--learned", "--hyperplane", "--bound", "-1"], "--bound -1.0: expected a number"),
                          (["--learned", "--hyperplane", "--per-layer"], "drop --per-layer"),
                          (["--greedy", "--bound", "0.3"], "--bound is not an option of the greedy soup")):
        result = runner.invoke(cli, ["cook", *args, *paths, "-o", str(tmp_path / "x.safetensors")])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_projection_onto_the_bounded_hyperplane_by_hand():
    # clamp(v - τ, -0.5, 1.5) sums to 1 at τ = 0: [2, 0, -1] -> [1.5, 0, -0.5].
    projected = learned.project(torch.tensor([2.0, 0.0, -1.0]), 1.0, -0.5, 1.5)
    assert torch.allclose(projected, torch.tensor([1.5, 0.0, -0.5]), atol=1e-6)
    # Inside the box already: a shift of every entry by the same amount, here (1 - 0.7) / 3.
    projected = learned.project(torch.tensor([0.2, 0.2, 0.3]), 1.0, -0.5, 1.5)
    assert torch.allclose(projected, torch.tensor([0.3, 0.3, 0.4]), atol=1e-6)
