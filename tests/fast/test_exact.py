"""Issue 17, items 1-2: WiSE-FT from a probed start to any soup, wherever the soup lives; and every figure
the fast paths compute equal to a plain evaluation of the saved weights, exactly."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from soup.cli import cli
from soup.cook.weights import weighted_average
from soup.models.checkpoint import read_checkpoint, save_checkpoint

from conftest import plain_scores, plain_top1, probed_start_by_hand, run_study, tiny_recipe, tiny_vit_model


@pytest.fixture(scope="module")
def probed_work(tmp_path_factory, small_sketch_root):
    """`soup train` of a probed recipe into checkpoints/, then `soup cook --uniform --no-eval`."""
    work = tmp_path_factory.mktemp("probed")
    recipe = tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.5, probe={"epochs": 2, "lr": 1e-2}),
                         data={"image_size": 28}, train={"epochs": 2, "lr": 5e-3},
                         sweep={"train.seed": [0, 1]})
    run_study(work, recipe, ["cook", "--uniform", "--no-eval"])
    return work



def test_wise_ft_from_a_probed_start_to_a_soup_in_the_default_layout(probed_work, monkeypatch):
    monkeypatch.chdir(probed_work)
    result = CliRunner().invoke(cli, ["cook", "--interpolate", "checkpoints/soups/uniform.safetensors",
                                      "--alpha", "0:1:0.25", "-o", "checkpoints/soups/wise.safetensors"])
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(probed_work / "checkpoints" / "soups" / "uniform.safetensors")
    wise = read_checkpoint(probed_work / "checkpoints" / "soups" / "wise.safetensors")
    start, b = probed_start_by_hand(probed_work, soup), soup.state_dict()
    # The start interpolated with the soup's trained head: (1 - a)·start + a·soup on the backbone.
    a_side = {k: (b[k] if k.startswith("head.") else start[k]) for k in b}
    sweep = wise.meta["interpolation"]["sweep"]
    assert [s["alpha"] for s in sweep] == [0.0, 0.25, 0.5, 0.75, 1.0]
    said = " ".join(result.output.split())
    assert "interpolate (start -> uniform) on val: alpha 0 " in said
    for step in sweep:
        alpha = step["alpha"]
        by_hand = {k: ((1 - alpha) * a_side[k].double() + alpha * b[k].double()).float() for k in b}
        assert all(torch.allclose(by_hand[k], weighted_average([(a_side, 1 - alpha), (b, alpha)])[k], atol=1e-6)
                   for k in b)
        assert step["top1"] == plain_top1(soup, by_hand), alpha  # the printed figure, recomputed plainly
        assert f"alpha {alpha:g} {step['top1']:.2%}" in said  # one line: "(start -> uniform) on val: alpha 0 ..."
    alpha = wise.meta["interpolation"]["alpha"]
    assert alpha == max(sweep, key=lambda s: s["top1"])["alpha"]
    weights = wise.state_dict()
    assert all(torch.allclose(weights[k], ((1 - alpha) * a_side[k].double() + alpha * b[k].double()).float(),
                              atol=1e-6) for k in b)
    assert wise.meta["selection"]["top1"] == plain_top1(wise)


def test_a_soup_moved_elsewhere_still_finds_its_probed_start(probed_work, tmp_path, monkeypatch):
    monkeypatch.chdir(probed_work)
    moved = tmp_path / "kept" / "my_soup.safetensors"
    moved.parent.mkdir()
    shutil.copy(probed_work / "checkpoints" / "soups" / "uniform.safetensors", moved)
    runner = CliRunner()
    result = runner.invoke(cli, ["cook", "--interpolate", str(moved), "--alpha", "0.5", "--no-eval",
                                 "-o", str(tmp_path / "kept" / "wise.safetensors")])
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(moved)
    start, b = probed_start_by_hand(probed_work, soup), soup.state_dict()
    weights = read_checkpoint(tmp_path / "kept" / "wise.safetensors").state_dict()
    assert all(torch.allclose(weights[k], b[k] if k.startswith("head.") else (start[k] + b[k]) / 2, atol=1e-6)
               for k in b)
    # Every caller that rebuilds a start for a soup follows the same rule: inspect, and stock's ingredients.
    result = runner.invoke(cli, ["inspect", str(moved), "checkpoints/tiny", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["notes"] == [] and all(row["delta_norm"] is not None for row in report["checkpoints"])
    result = runner.invoke(cli, ["cook", "--stock", "checkpoints/tiny", "--no-eval",
                                 "-o", str(tmp_path / "kept" / "stock.safetensors")])
    assert result.exit_code == 0, result.output


def test_a_missing_or_changed_probe_is_named(probed_work, tmp_path, monkeypatch):
    work = tmp_path / "copy"
    shutil.copytree(probed_work, work)
    monkeypatch.chdir(work)
    [probe] = (work / "checkpoints" / "tiny").glob("probe-*/model.safetensors")
    checkpoint = read_checkpoint(probe)
    state = checkpoint.state_dict()
    save_checkpoint(probe, {**state, "head.weight": state["head.weight"] + 0.01}, checkpoint.meta)
    args = ["cook", "--interpolate", "checkpoints/soups/uniform.safetensors", "--alpha", "0.5", "--no-eval",
            "-o", "wise.safetensors"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{probe.relative_to(work)}: this probed start is not the one" in " ".join(result.output.split())
    assert "restore the original" in result.output and "model.weights" not in result.output

    shutil.rmtree(probe.parent)
    result = CliRunner().invoke(cli, args)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "which is missing (looked in" in said, said
    assert str(probe.parent.relative_to(work)) in said and not (work / "wise.safetensors").exists()


def test_an_average_keeps_tensors_all_members_share_bit_for_bit():
    shared = torch.randn(64) * 3
    members = [{"frozen": shared.clone(), "trained": torch.randn(64)} for _ in range(3)]
    mixed = weighted_average([(m, 1 / 3) for m in members])
    assert torch.equal(mixed["frozen"], shared)
    # The arithmetic itself does not keep them (why the rule exists), and a trained tensor is averaged.
    assert not torch.equal(sum(m["frozen"] * (1 / 3) for m in members), shared)
    by_hand = sum(m["trained"].double() for m in members) / 3
    assert torch.allclose(mixed["trained"].double(), by_hand, atol=1e-6)


@pytest.fixture(scope="module")
def augmented_work(tmp_path_factory, sketch_root):
    """Three augmented EMA ingredients of a ViT whose val passes run on cached prefix tokens, and soups."""
    work = tmp_path_factory.mktemp("augmented")
    recipe = tiny_recipe(sketch_root, model=tiny_vit_model(freeze=0.5),
                         data={"image_size": 28, "augment": "trivialaugment"},
                         train={"epochs": 2, "ema": 0.9, "amp": "fp16", "lr": 5e-3},
                         sweep={"train.seed": [0, 1, 2]})
    trained, _, _ = run_study(work, recipe, ["cook", "--uniform"], ["cook", "--greedy"])
    assert "val: prefix cache" in trained  # the path under test
    return work


def test_recorded_and_cooked_figures_are_the_saved_weights_own(augmented_work):
    checkpoints = sorted((augmented_work / "checkpoints" / "tiny").glob("*/model.safetensors"))
    assert len(checkpoints) == 3
    for path in checkpoints:
        checkpoint = read_checkpoint(path)
        metrics = json.loads((path.parent / "metrics.json").read_text())
        plain = plain_scores(checkpoint)
        assert checkpoint.meta["val_acc"] == metrics["val_acc"] == plain["top1"], path
        last = checkpoint.meta["val_history"][-1]  # the EMA weights' figures, as saved
        assert (last["val_top1"], last["val_top5"], last["val_loss"]) == (plain["top1"], plain["top5"], plain["loss"])
    for name in ("uniform", "greedy"):
        soup = read_checkpoint(augmented_work / "checkpoints" / "soups" / f"{name}.safetensors")
        assert soup.meta["selection"]["top1"] == plain_top1(soup), name
    # Every greedy trial (scored through the cache) recomputed: the mean of the kept ones and the candidate.
    by_name = {c.name: c for c in map(read_checkpoint, checkpoints)}
    greedy = read_checkpoint(augmented_work / "checkpoints" / "soups" / "greedy.safetensors")
    kept = []
    for step in greedy.meta["steps"]:
        trial = kept + [by_name[step["candidate"]]]
        weights = weighted_average([(c, 1 / len(trial)) for c in trial])
        assert step["top1"] == plain_top1(greedy, weights), step
        kept = trial if step["kept"] else kept


def test_soup_eval_equals_soup_eval_no_cache_field_for_field(augmented_work, monkeypatch):
    monkeypatch.chdir(augmented_work)
    runner = CliRunner()
    cached = runner.invoke(cli, ["eval", "--json", "--ensemble"])
    plain = runner.invoke(cli, ["eval", "--json", "--ensemble", "--no-cache"])
    assert cached.exit_code == 0 and plain.exit_code == 0, cached.output + plain.output
    cached_rows, plain_rows = json.loads(cached.output), json.loads(plain.output)
    assert [r["kind"] for r in cached_rows].count("ingredient") == 3 and len(cached_rows) == 6
    assert cached_rows == plain_rows
