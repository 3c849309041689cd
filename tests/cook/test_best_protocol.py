"""`soup cook --best` compares methods on data none of them selected on (issue 33, section 5): every method
cooks on all parts of val but one and is scored on that one, for each part (4 by default). Against a hand
computation: on a tiny pool with 4 val images a class, picking on the split the methods selected on chooses
one method and cross-fitting on two halves another; every figure is recomputed by a plain evaluation of
weights rebuilt from the files."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from soup.cli import cli
from soup.data.folders import load_split
from soup.data.sketches import generate_sketches
from soup.models.backbones import model_from_checkpoint
from soup.models.checkpoint import read_checkpoint
from soup.models.inference import make_loader, predict
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import CLASSES, CPU, invoke_with_console, one_error_line, plain_scores, state_close, tiny_recipe, with_bn_reset

METHODS = ["uniform", "greedy", "topk", "guided", "learned", "stock"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Four tiny ResNet ingredients (two seeds x two lr) on 20 train and 4 val images a class."""
    work = tmp_path_factory.mktemp("protocol")
    generate_sketches(work / "data", CLASSES, train_per_class=20, val_per_class=4, test_images=2, image_size=32, seed=5)
    recipe = recipe_from_dict(tiny_recipe(work / "data", train={"epochs": 2},
                                          sweep={"train.seed": [0, 1], "train.lr": [0.002, 0.02]}))
    for ingredient in expand_sweep(recipe):
        train_ingredient(ingredient, work / "checkpoints", Console(quiet=True))
    return work


def cook(work: Path, monkeypatch, *args: str):
    monkeypatch.chdir(work)
    result = invoke_with_console(["cook", *args], monkeypatch, 200)
    assert result.exit_code == 0, result.output
    return result


def plain_predicted(template, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, target) of every val image: the whole model over a plain loader."""
    model = model_from_checkpoint(template)
    model.load_state_dict(state)
    dataset = load_split(recipe_from_dict(template.recipe).data, "val", classes=template.classes)
    logits, targets = predict(model, make_loader(dataset, 128, 0, CPU), CPU)
    return logits.argmax(1), torch.as_tensor(targets)


def rebuilt(members: list, by_name: dict, soup) -> dict:
    """A fold soup's weights from its recorded members: one ingredient as it is, else the weighted average
    (float64 sums) with BatchNorm statistics measured for it as the soup's bn_reset records."""
    if len(members) == 1:
        return by_name[members[0][0]].state_dict()
    states = [(by_name[name].state_dict(), weight) for name, weight in members]
    mixed = {k: (sum(s[k].double() * w for s, w in states)).float() if v.is_floating_point() else v
             for k, v in states[0][0].items()}
    return with_bn_reset(soup, mixed)


def cross_fitted_by_hand(work: Path, record: dict, ingredients: list, targets: torch.Tensor) -> dict:
    """Each method's cross-fitted top-1 from its recorded folds: every fold's soup rebuilt from the members
    it chose and evaluated plainly on the part it is scored on; each fold's count checked on the way."""
    by_name, parts = {c.name: c for c in ingredients}, record["compared_on"]["parts"]
    best = read_checkpoint(work / "soups" / "best.safetensors")
    names = ["val half 1", "val half 2"] if len(parts) == 2 else [f"val part {i + 1} of {len(parts)}" for i in
                                                                   range(len(parts))]
    crossed = {}
    for method in METHODS:
        correct = 0
        for fold, scored, name in zip(record["folds"][method], parts, names, strict=True):
            assert fold["scored_on"] == name and fold["images"] == len(scored)
            if method == "stock":  # it chooses nothing: each fold's soup is the one stock soup
                state = read_checkpoint(work / "soups" / "stock.safetensors").state_dict()
            else:
                state = rebuilt(fold["members"], by_name, best)
            hits = (plain_predicted(ingredients[0], state)[0][scored] == targets[scored]).sum().item()
            assert fold["correct"] == hits, (method, fold)
            correct += hits
        crossed[method] = correct / len(targets)
        assert record["candidates"][method] == pytest.approx(crossed[method], abs=1e-12), method
    return crossed


def test_cross_fitting_picks_another_method_than_the_split_the_methods_selected_on(pool, monkeypatch):
    ingredients = [read_checkpoint(p) for p in sorted((pool / "checkpoints" / "tiny").glob("*/model.safetensors"))]
    # The old protocol, by hand: each method cooked on all of val, compared on all of val (its selection set).
    same = {}
    for method in METHODS:
        cook(pool, monkeypatch, f"--{method}", "-o", f"soups/{method}.safetensors")
        same[method] = plain_scores(read_checkpoint(pool / "soups" / f"{method}.safetensors"))["top1"]
    same_pick = max(METHODS, key=lambda m: same[m])  # ties: the earlier method

    result = cook(pool, monkeypatch, "--best", "--folds", "2", "-o", "soups/best.safetensors")
    said = " ".join(result.output.split())
    best = read_checkpoint(pool / "soups" / "best.safetensors")
    record = best.meta["best"]
    first, second = record["compared_on"]["parts"]
    _, targets = plain_predicted(ingredients[0], ingredients[0].state_dict())
    # Two disjoint halves covering val, stratified: each class split as evenly as it can be.
    assert sorted(first + second) == list(range(len(targets))) and abs(len(first) - len(second)) <= 1
    for label in range(len(CLASSES)):
        assert abs(sum(targets[first] == label).item() - sum(targets[second] == label).item()) <= 1
    assert (f"comparing 6 methods on val cross-fitted (each half chooses for the other: {len(first)} + "
            f"{len(second)} images, seed 0, stratified by class)") in said

    crossed = cross_fitted_by_hand(pool, record, ingredients, targets)
    for method in METHODS:
        assert f"{method} {crossed[method]:.2%}" in said
    cross_pick = max(METHODS, key=lambda m: crossed[m])
    assert record["winner"] == cross_pick != same_pick, (same, crossed)

    # What --best writes is the winner cooked on all of val, and the figure it prints for it is a plain
    # evaluation of the file.
    alone = read_checkpoint(pool / "soups" / f"{cross_pick}.safetensors")
    assert state_close(best.state_dict(), alone.state_dict())
    top1 = plain_scores(best)["top1"]
    assert best.meta["selection"]["top1"] == top1
    assert f": {top1:.2%} on val (the selection set)" in said  # the "wrote" line of best.safetensors
    # The ingredient val picks is cross-fitted too: the best on one half predicts the other.
    picked = torch.zeros(len(targets), dtype=torch.bool)
    for chosen, scored in ((first, second), (second, first)):
        hits = [(plain_predicted(c, c.state_dict())[0][chosen] == targets[chosen]).sum().item() for c in ingredients]
        winner = ingredients[max(range(len(ingredients)), key=lambda i: (hits[i], -i))]
        picked[scored] = plain_predicted(winner, winner.state_dict())[0][scored] == targets[scored]
    assert f"the ingredient val picks ingredient 1 {picked.double().mean().item():.2%}" in said


def test_best_cross_fits_on_k_parts_with_folds(pool, monkeypatch):
    """--folds 3: three stratified parts, each scored by the soup cooked on the other two."""
    ingredients = [read_checkpoint(p) for p in sorted((pool / "checkpoints" / "tiny").glob("*/model.safetensors"))]
    for method in ("stock",):  # the by-hand check reads the one stock soup (it chooses nothing)
        cook(pool, monkeypatch, f"--{method}", "-o", f"soups/{method}.safetensors", "--overwrite")
    result = cook(pool, monkeypatch, "--best", "--folds", "3", "-o", "soups/best.safetensors", "--overwrite")
    record = read_checkpoint(pool / "soups" / "best.safetensors").meta["best"]
    parts = record["compared_on"]["parts"]
    _, targets = plain_predicted(ingredients[0], ingredients[0].state_dict())
    assert len(parts) == 3 and sorted(sum(parts, [])) == list(range(len(targets)))
    for label in range(len(CLASSES)):
        counts = [sum(targets[part] == label).item() for part in parts]
        assert max(counts) - min(counts) <= 1
    for fold, part in zip(record["folds"]["greedy"], range(3)):
        assert fold["chosen_on"] == f"val but part {part + 1}"
    crossed = cross_fitted_by_hand(pool, record, ingredients, targets)
    assert record["winner"] == max(METHODS, key=lambda m: crossed[m])
    sizes = " + ".join(str(len(p)) for p in parts)
    assert (f"val cross-fitted (each of 3 parts scored by what the others chose: {sizes} images, seed 0, "
            "stratified by class)") in " ".join(result.output.split())


def test_best_refuses_a_split_too_small_to_cut(tmp_path):
    generate_sketches(tmp_path / "data", CLASSES[:1], train_per_class=4, val_per_class=1, test_images=1,
                      image_size=32, seed=0)
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "data", sweep={"train.seed": [0, 1]}))
    for ingredient in expand_sweep(recipe):
        train_ingredient(ingredient, tmp_path / "checkpoints", Console(quiet=True))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = CliRunner().invoke(cli, ["cook", "--best", "-o", "best.safetensors"])
    one_error_line(result, "--best compares methods by cross-fitting on 4 parts of val, which holds 1 image; "
                           "it needs at least 4 (or fewer --folds)")
    assert not (tmp_path / "best.safetensors").exists()


def test_best_protocol_benchmark_at_a_tiny_size(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import best_protocol
    tiny = ["--studies", "1", "--classes", "4", "--train-per-class", "6", "--test-per-class", "4", "--trials", "3",
            "--epochs", "2", "--pretrain-epochs", "1", "--pretrain-per-class", "6", "--image-size", "32", "--page",
            "32", "--folds", "2", "--work", str(tmp_path)]
    [row] = best_protocol.main(tiny)
    printed = " ".join(capsys.readouterr().out.split())
    assert row["same split"] == max(row["val"], key=lambda m: row["val"][m]) and row[2]["winner"] in row["test"]
    gain = (row[2]["test"] - row["picked"]) * 100
    assert f"2-fold picks {row[2]['winner']} ({gain:+.2f})" in printed
    assert f"2-fold cross-fit {gain:+.2f} (picks {row[2]['winner']})" in printed
