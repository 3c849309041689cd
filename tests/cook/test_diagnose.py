"""Seeing why a soup chose what it chose: `soup inspect`, `soup plot`, and ensembles across architectures."""

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from soup.cli import cli
from soup.cook.cooking import cook
from soup.cook.diagnose import loss_line, pair_geometry
from soup.cook.weights import starting_weights, weighted_average
from soup.judge.evaluate import eval_rows
from soup.models.checkpoint import Checkpoint, read_checkpoint
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.score.evaluator import Evaluator
from soup.train.loop import train_ingredient

from conftest import CLASSES, plain_scores, tiny_recipe, tiny_vit_model, with_bn_reset

quiet = Console(quiet=True)


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory, small_sketch_root):
    """Two ResNet ingredients from one start, a ResNet from another start, a tiny ViT, and a greedy soup."""
    out = tmp_path_factory.mktemp("diagnose")

    def train(recipe):
        return [read_checkpoint(train_ingredient(i, out, quiet)) for i in expand_sweep(recipe_from_dict(recipe))]

    pair = train(tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1]}))
    stranger = train(tiny_recipe(small_sketch_root, name="stranger", model={"init_seed": 7}))[0]
    vit = train(tiny_recipe(small_sketch_root, name="vit", data={"root": str(small_sketch_root), "image_size": 28},
                            model=tiny_vit_model()))[0]
    greedy = read_checkpoint(cook("greedy", pair, out / "soups" / "greedy.safetensors", "val", console=quiet))
    return {"pair": pair, "stranger": stranger, "vit": vit, "greedy": greedy, "out": out}


def test_pairs_report_start_distance_and_cosine(kitchen):
    a, b = kitchen["pair"]
    report = pair_geometry([a, b, kitchen["stranger"], kitchen["vit"]])
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert len(pairs) == 6
    ab = pairs[(a.name, b.name)]
    start = starting_weights(a)
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if sa[k].is_floating_point()]
    da = torch.cat([(sa[k] - start[k]).double().flatten() for k in keys])
    db = torch.cat([(sb[k] - start[k]).double().flatten() for k in keys])
    assert ab["same_start"] and ab["cosine"] == pytest.approx(float(da @ db / (da.norm() * db.norm())), abs=1e-6)
    assert ab["distance"] == pytest.approx(float((da - db).norm()), rel=1e-6)
    assert report["checkpoints"][0]["delta_norm"] == pytest.approx(float(da.norm()), rel=1e-6)
    with_stranger = pairs[(a.name, kitchen["stranger"].name)]
    assert not with_stranger["same_start"] and with_stranger["cosine"] is None and with_stranger["distance"] > 0
    with_vit = pairs[(a.name, kitchen["vit"].name)]
    assert not with_vit["comparable"] and with_vit["distance"] is None


def test_line_between_two_ingredients(kitchen):
    a, b = kitchen["pair"]
    result = loss_line(a, b, points=3)
    assert [p["t"] for p in result["line"]] == [0.0, 0.5, 1.0]
    evaluator = Evaluator("val")
    assert result["line"][0]["top1"] == pytest.approx(evaluator(a)["top1"])
    assert result["line"][-1]["top1"] == pytest.approx(evaluator(b)["top1"])
    mid = result["line"][1]["top1"]
    expected = max(0.0, (result["line"][0]["top1"] + result["line"][-1]["top1"]) / 2 - mid)
    assert result["barrier"] == pytest.approx(expected)
    # The midpoint is the plain average with its BatchNorm statistics measured by update_bn on the recorded
    # images (ResNets: a line through averaged statistics would overstate the barrier).
    recorded = Checkpoint(a.path, {**a.meta, "bn_reset": result["bn_reset"]})
    weights = weighted_average([(a, 0.5), (b, 0.5)])
    assert mid == plain_scores(a, with_bn_reset(recorded, weights))["top1"]


def test_inspect_cli(kitchen):
    a, b = kitchen["pair"]
    runner = CliRunner()
    paths = [str(a.path), str(b.path), str(kitchen["stranger"].path), str(kitchen["greedy"].path)]
    result = runner.invoke(cli, ["inspect", *paths, "--line", paths[0], paths[1], "--points", "3"])
    assert result.exit_code == 0, result.output
    assert "other start: no soup" in result.output and "barrier" in result.output
    assert "greedy step" in result.output
    result = runner.invoke(cli, ["inspect", *paths[:3], "--json"])
    report = json.loads(result.output)
    assert len(report["pairs"]) == 3 and "line" not in report
    result = runner.invoke(cli, ["inspect", paths[0], str(kitchen["vit"].path), "--line", paths[0],
                                 str(kitchen["vit"].path)])
    assert result.exit_code == 2 and "no line between them" in result.output


def test_plot_writes_a_png_with_the_expected_series(kitchen, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from soup.judge.plot import plot_checkpoints

    uniform = read_checkpoint(cook("uniform", kitchen["pair"], tmp_path / "uniform.safetensors", None, console=quiet))
    checkpoints = kitchen["pair"] + [kitchen["greedy"], uniform]
    result = plot_checkpoints(checkpoints, tmp_path / "soups.png", "val")
    png = tmp_path / "soups.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(str(png)).ndim == 3
    series, rows = result["series"], result["rows"]
    assert series["ingredients (sorted)"] == sorted(r["top1"] for r in rows if r["kind"] == "ingredient")
    assert series["greedy"] == [next(r["top1"] for r in rows if r["kind"] == "greedy")]
    assert series["uniform"] == [next(r["top1"] for r in rows if r["kind"] == "uniform")]
    ensemble = next(r for r in rows if r["kind"] == "ensemble")
    assert series[ensemble["name"]][0] == ensemble["top1"]
    steps = kitchen["greedy"].meta["steps"]
    tried = sorted(series["greedy: kept"] + series.get("greedy: left out", []))
    assert tried == sorted(s["top1"] for s in steps)
    assert len(series["greedy: soup so far"]) == len(steps)

    result = CliRunner().invoke(cli, ["plot", *[str(c.path) for c in checkpoints], "-o", str(tmp_path / "cli.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_how_to_install(kitchen, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = CliRunner().invoke(cli, ["plot", str(kitchen["pair"][0].path), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "pip install matplotlib" in result.output


def test_ensemble_across_architectures_averages_probabilities(kitchen):
    resnet, vit = kitchen["greedy"], kitchen["vit"]
    rows = eval_rows([resnet, vit], Evaluator("val"), ensemble=True)
    row = rows[-1]
    assert row["kind"] == "ensemble" and "mean of probabilities, 2 architectures" in row["name"]
    evaluator = Evaluator("val")
    (lr, targets), (lv, _) = evaluator.logits(resnet), evaluator.logits(vit)
    probabilities = (lr.softmax(1) + lv.softmax(1)) / 2
    expected = (probabilities.argmax(1) == torch.tensor(targets)).float().mean().item()
    assert row["top1"] == pytest.approx(expected)
    assert row["loss"] == pytest.approx(-probabilities[range(len(targets)), targets].log().mean().item(), rel=1e-5)
    # one architecture keeps the paper's logit ensemble
    same = eval_rows(kitchen["pair"], Evaluator("val"), ensemble=True)[-1]
    assert same["name"] == "ensemble (mean of logits)" and same["members"] == 2


def test_submit_ensemble_writes_plain_csv_and_provenance(kitchen, tmp_path, small_sketch_root):
    runner = CliRunner()
    out = tmp_path / "sub.csv"
    paths = [str(kitchen["greedy"].path), str(kitchen["vit"].path)]
    result = runner.invoke(cli, ["submit", *paths, "-o", str(out)])
    assert result.exit_code == 2 and "add --ensemble" in result.output
    result = runner.invoke(cli, ["submit", *paths, "--ensemble", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Id", "Category"] and all(len(r) == 2 for r in rows)
    test_files = sorted(p.stem for p in (small_sketch_root / "test_images" / "mistery_category").iterdir())
    assert [r[0] for r in rows[1:]] == test_files
    assert all(0 <= int(r[1]) < len(CLASSES) for r in rows[1:])
    provenance = json.loads((tmp_path / "sub.csv.json").read_text())
    assert provenance["kind"] == "ensemble" and "probabilities" in provenance["combined"]
    assert [m["path"] for m in provenance["members"]] == paths


def test_cook_plot_flag_draws_beside_the_soup(kitchen, tmp_path):
    pytest.importorskip("matplotlib")
    paths = [str(c.path) for c in kitchen["pair"]]
    result = CliRunner().invoke(cli, ["cook", "--stock", *paths, "--no-eval", "-o", str(tmp_path / "stock.safetensors"),
                                      "--plot"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "soups.png").read_bytes()[:4] == b"\x89PNG" and "wrote" in result.output
