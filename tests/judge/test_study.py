"""Issue 19: draws that end below the probed start they began from are flagged where a study is summarised
(`soup train`'s end and `soup eval`), with the reason to suspect, measured against the sweep."""

import json

import pytest
from click.testing import CliRunner

from soup.cli import cli
from soup.judge.study import below_start
from soup.models.checkpoint import find_checkpoints, rewrite_metadata, save_checkpoint

from conftest import probed_start_by_hand, run_study, tiny_recipe, tiny_vit_model


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_sketch_root):
    """Four probed ingredients under checkpoints/; one made to underfit, one pushed off the start's basin."""
    work = tmp_path_factory.mktemp("study")
    recipe = tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.5, probe={"epochs": 2, "lr": 1e-2}),
                         data={"image_size": 28}, train={"epochs": 1}, sweep={"train.seed": [0, 1, 2, 3]})
    run_study(work, recipe)
    ingredients = find_checkpoints([work / "checkpoints" / "tiny"], kinds={"ingredient"})
    start_acc = ingredients[0].meta["probe"]["val_acc"]
    # 00 underfits: below the start, its last train loss far above the others'.
    meta = json.loads(json.dumps(ingredients[0].meta))
    meta["val_acc"] = start_acc - 0.1
    meta["val_history"][-1]["train_loss"] = 10 * max(c.meta["val_history"][-1]["train_loss"] for c in ingredients)
    rewrite_metadata(ingredients[0].path, meta)
    # 01 left the basin: its trained tensors moved ten times as far from the start, and it scores below it.
    start = probed_start_by_hand(work, ingredients[1])
    state = ingredients[1].state_dict()
    moved = {k: (start[k] + 10 * (v - start[k]) if v.is_floating_point() else v) for k, v in state.items()}
    meta = json.loads(json.dumps(ingredients[1].meta))
    meta["val_acc"] = start_acc - 0.05
    save_checkpoint(ingredients[1].path, moved, meta)
    return work



def distance_by_hand(start, checkpoint) -> float:
    """`checkpoint`'s distance from `start` (its probed start, from probed_start_by_hand)."""
    state = checkpoint.state_dict()
    return sum((state[k].double() - start[k].double()).pow(2).sum().item()
               for k in state if state[k].is_floating_point()) ** 0.5


def test_below_start_names_each_draw_and_its_reason(study):
    ingredients = find_checkpoints([study / "checkpoints" / "tiny"], kinds={"ingredient"})
    records = {r["name"]: r for r in below_start(ingredients)}
    assert set(records) == {"tiny/00-seed0", "tiny/01-seed1"}
    underfit, off = records["tiny/00-seed0"], records["tiny/01-seed1"]
    assert underfit["start_acc"] == ingredients[0].meta["probe"]["val_acc"] > underfit["val_acc"]
    assert [r.split(":")[0] for r in underfit["reasons"]] == ["underfit"]
    assert [r.split(":")[0] for r in off["reasons"]] == ["off-basin"]
    start = probed_start_by_hand(study, ingredients[0])  # one start for the whole sweep
    distances = sorted(distance_by_hand(start, c) for c in ingredients)
    median = (distances[1] + distances[2]) / 2
    far = distance_by_hand(start, ingredients[1])
    assert off["reasons"][0] == f"off-basin: {far:.3g} from the start, {far / median:.1f}x the sweep's median"


def test_soup_eval_and_soup_train_flag_them(study, monkeypatch):
    monkeypatch.chdir(study)
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", "--json", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["tiny/00-seed0"]["below_start"]["reasons"][0].startswith("underfit")
    assert rows["tiny/02-seed2"]["below_start"] is None
    result = runner.invoke(cli, ["eval", "--bootstrap", "0"])
    said = " ".join(result.output.split())
    assert "2 of 4 ingredients ended below the probed start they began from" in said
    assert "tiny/01-seed1" in said and "off-basin" in said
    result = runner.invoke(cli, ["train", "r.yaml", "--resume"])  # finished: skipped, then summarised
    assert result.exit_code == 0, result.output
    assert "2 of 4 ingredients ended below the probed start" in " ".join(result.output.split())


def test_without_a_probe_nothing_is_flagged(small_sketch_root, tmp_path):
    [output] = run_study(tmp_path, tiny_recipe(small_sketch_root))  # exit 0 checked there
    assert "below the probed start" not in output
    assert below_start(find_checkpoints([tmp_path / "checkpoints"])) == []
