"""Honest numbers through the CLI: intervals, paired comparisons, per-class, temperature scaling, the
reliability diagram, and greedy's gains with their intervals."""

import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from soup.cook.cooking import cook
from soup.models.checkpoint import read_checkpoint, rewrite_metadata
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import invoke_with_console, tiny_recipe

quiet = Console(quiet=True)


@pytest.fixture(scope="module")
def shelf(tmp_path_factory, small_sketch_root):
    """Three ingredients of one start (a recipe with a holdout slice), a greedy soup selected on val and a
    uniform soup without data."""
    out = tmp_path_factory.mktemp("honest")
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, data={"root": str(small_sketch_root),
                                                                   "image_size": 32, "holdout": 0.25},
                                          sweep={"train.seed": [0, 1, 2]}))
    ingredients = [read_checkpoint(train_ingredient(i, out / "checkpoints", quiet)) for i in expand_sweep(recipe)]
    soups = out / "checkpoints" / "soups"
    cook("greedy", ingredients, soups / "greedy.safetensors", "val", console=quiet)
    cook("uniform", ingredients, soups / "uniform.safetensors", None, console=quiet)
    return {"out": out, "ingredients": ingredients}


@pytest.fixture
def run(shelf, monkeypatch):
    monkeypatch.chdir(shelf["out"])

    def invoke(args, width=80):
        return invoke_with_console(args, monkeypatch, width)
    return invoke


def test_eval_json_carries_intervals_and_paired_comparisons(run, shelf):
    result = run(["eval", "--json", "--per-class", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    by_kind = {row["kind"]: row for row in rows}
    ingredients = [row for row in rows if row["kind"] == "ingredient"]
    best = max(ingredients, key=lambda row: row["top1"])
    for row in rows:
        assert row["top1_low"] <= row["top1"] <= row["top1_high"]
        assert row["nll"] == row["loss"] and 0 <= row["ece"] <= 1 and 0 <= row["top5"] <= 1
    # soups are present, so each row is compared with the best ingredient (the default --compare best)
    assert best["compare"] is None
    greedy = by_kind["greedy"]["compare"]
    assert greedy["ref"] == best["name"] and greedy["diff"] == pytest.approx(by_kind["greedy"]["top1"] - best["top1"])
    assert greedy["low"] <= greedy["diff"] <= greedy["high"] and 0 < greedy["p"] <= 1
    assert greedy["selection_set"] is True and by_kind["uniform"]["compare"]["selection_set"] is False
    top = max(rows, key=lambda row: row["top1"])
    assert len(top["per_class"]["worst"]) == 2 and "confused" in top["per_class"]
    assert sum("per_class" in row for row in rows) == 1

    result = run(["eval", "--json", "--bootstrap", "0", "--compare", "uniform"])
    rows = json.loads(result.output)
    assert all(row["top1_low"] is None for row in rows)
    greedy = next(row for row in rows if row["kind"] == "greedy")["compare"]
    assert greedy["ref"] == "uniform" and greedy["low"] is None and greedy["p"] <= 1


def test_eval_table_fits_80_columns_and_says_what_it_left_out(run):
    result = run(["eval", "--per-class", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "95% CI" in result.output and "Δ pts" in result.output and "McNemar" in result.output
    assert "the set that selected this soup" in result.output and "not a test" in result.output
    assert "left out at this width: images" in result.output
    assert "hardest classes" in result.output and "most confused pairs" in result.output
    wide = run(["eval"], width=200)
    assert "left out" not in wide.output and "images" in wide.output and "ECE" in wide.output


def test_eval_compare_mistakes_are_one_line(run):
    result = run(["eval", "--compare", "nosuch"])
    assert result.exit_code == 2 and "--compare nosuch: no single row" in result.output
    assert len(result.output.strip().splitlines()) == 1
    soups = ["checkpoints/soups/greedy.safetensors", "checkpoints/soups/uniform.safetensors"]
    result = run(["eval", *soups, "--compare", "best"])
    assert result.exit_code == 2 and "needs an ingredient" in result.output
    result = run(["eval", *soups])  # no ingredient: no default comparison, no error
    assert result.exit_code == 0 and "Δ pts" not in result.output


def test_calibrate_stores_a_temperature_and_leaves_weights_bit_identical(run, shelf, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(shelf["ingredients"][0].path, path)
    before = read_checkpoint(path).state_dict()
    plain = json.loads(run(["eval", str(path), "--json"]).output)[0]
    result = run(["calibrate", str(path)])
    assert result.exit_code == 0, result.output
    assert "fitted on val" in result.output and "NLL" in result.output and "ECE" in result.output
    calibrated = read_checkpoint(path)
    record = calibrated.meta["calibration"]
    assert record["split"] == "val" and 0 < record["temperature"] and record["nll_after"] <= record["nll_before"]
    after = calibrated.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert calibrated.meta["recipe"] == shelf["ingredients"][0].meta["recipe"]

    row = json.loads(run(["eval", str(path), "--json"]).output)[0]
    assert row["temperature"] == record["temperature"] and row["top1"] == plain["top1"]
    assert row["nll"] == pytest.approx(record["nll_after"], rel=1e-4) and row["nll"] != plain["nll"]
    table = run(["eval", str(path)], width=200).output
    assert f"T={record['temperature']:.3g}" in table


@pytest.mark.parametrize("value", ["nan", -1.0, 0, "2", True, None])
def test_a_temperature_that_is_not_a_finite_positive_number_is_refused(run, shelf, tmp_path, value):
    path = tmp_path / "model.safetensors"
    shutil.copy(shelf["ingredients"][0].path, path)
    meta = read_checkpoint(path).meta
    temperature = float("nan") if value == "nan" else value
    rewrite_metadata(path, {**meta, "calibration": {"temperature": temperature}})
    result = run(["eval", str(path)])
    assert result.exit_code == 2 and "calibration.temperature" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_submit_ensemble_uses_stored_temperatures(run, shelf, tmp_path):
    paths = []
    for i, ingredient in enumerate(shelf["ingredients"][:2]):
        paths.append(tmp_path / f"m{i}.safetensors")
        shutil.copy(ingredient.path, paths[-1])
    rewrite_metadata(paths[0], {**read_checkpoint(paths[0]).meta, "calibration": {"temperature": 1.5}})
    result = run(["submit", *map(str, paths), "--ensemble", "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    members = json.loads((tmp_path / "s.csv.json").read_text())["members"]
    assert [m["temperature"] for m in members] == [1.5, 1.0]


def test_cook_greedy_on_holdout_reports_gains_and_the_val_verdict(run, shelf, tmp_path):
    out = tmp_path / "greedy.safetensors"
    names = [str(c.path) for c in shelf["ingredients"]]
    result = run(["cook", "--greedy", *names, "--select-on", "holdout", "--calibrate", "-o", str(out)], width=200)
    assert result.exit_code == 0, result.output
    assert "gain" in result.output and "95% CI" in result.output
    assert "on val, which took no part in selection" in result.output and "McNemar p=" in result.output
    soup = read_checkpoint(out)
    verdict = soup.meta["versus_best"]
    assert verdict["split"] == "val" and verdict["ref"] == soup.meta["steps"][0]["candidate"]
    assert verdict["low"] <= verdict["diff"] <= verdict["high"] and 0 < verdict["p"] <= 1
    assert all(step["gain"]["low"] <= step["gain"]["diff"] <= step["gain"]["high"] for step in soup.meta["steps"][1:])
    assert soup.meta["calibration"]["split"] == "holdout" and soup.meta["calibration"]["temperature"] > 0
    # selected on val: no split is left to report on
    result = run(["cook", "--greedy", *names, "-o", str(tmp_path / "g2.safetensors")], width=200)
    assert result.exit_code == 0 and "took no part" not in result.output
    assert "versus_best" not in read_checkpoint(tmp_path / "g2.safetensors").meta


def test_cook_calibrate_without_data_is_one_line(run, shelf, tmp_path):
    names = [str(c.path) for c in shelf["ingredients"]]
    result = run(["cook", *names, "--no-eval", "--calibrate", "-o", str(tmp_path / "u.safetensors")])
    assert result.exit_code == 2 and "--calibrate" in result.output and "--no-eval" in result.output
    assert not (tmp_path / "u.safetensors").exists()


def test_plot_reliability_draws_one_line_per_row(run, tmp_path):
    pytest.importorskip("matplotlib")
    result = run(["plot", "--reliability", "-o", str(tmp_path / "soups.png")])
    assert result.exit_code == 0, result.output
    picture = tmp_path / "reliability.png"
    assert picture.read_bytes()[:4] == b"\x89PNG" and "reliability of" in result.output
    result = run(["plot", "-o", str(tmp_path / "soups.png"), "--reliability", str(tmp_path / "soups.png")])
    assert result.exit_code == 2 and "name another file" in result.output


def test_rewrite_metadata_keeps_tensor_bytes(shelf, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(shelf["ingredients"][0].path, path)
    raw_before = path.read_bytes()
    rewrite_metadata(path, {**read_checkpoint(path).meta, "note": "x"})
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert read_checkpoint(path).meta["note"] == "x" and keys
    # safetensors writes the header first and the tensors' bytes after it, unchanged
    tail = sum(t.numel() * t.element_size() for t in read_checkpoint(path).state_dict().values())
    assert path.read_bytes()[-tail:] == raw_before[-tail:]
