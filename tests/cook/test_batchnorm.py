"""Issue 24: every soup's BatchNorm statistics re-estimated for its own weights, inside selection too, checked
against torch.optim.swa_utils.update_bn run by hand on the images the soup records; a model without
BatchNorm gives the same soup bytes with and without the reset; model.freeze_bn keeps the start's statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
import torch
from click.testing import CliRunner

import soup.cook.selector
from soup.cli import cli
from soup.cook import batchnorm
from soup.models.backbones import build_model, freeze_prefix
from soup.models.checkpoint import find_checkpoints, read_checkpoint
from soup.recipe.spec import recipe_from_dict

from conftest import one_error_line, plain_top1, run_study, tiny_recipe, with_bn_reset

STATS = ("running_mean", "running_var", "num_batches_tracked")


def mean_of(paths: list[Path]) -> dict[str, torch.Tensor]:
    states = [read_checkpoint(p).state_dict() for p in paths]
    return {k: (torch.stack([s[k].float() for s in states]).mean(0) if states[0][k].is_floating_point()
                else states[0][k]) for k in states[0]}


@pytest.fixture(scope="module")
def bn_study(tmp_path_factory, small_sketch_root):
    """Three tiny ResNets (BatchNorm everywhere) fine-tuned from one start with different seeds and lrs."""
    work = tmp_path_factory.mktemp("bn_study")
    recipe = tiny_recipe(small_sketch_root, train={"epochs": 2},
                         sweep={"train.seed": [0, 1, 2], "train.lr": [3e-3]})
    run_study(work, recipe)
    paths = sorted((work / "checkpoints" / "tiny").glob("*/model.safetensors"))
    return work, paths, small_sketch_root


def cook(work: Path, *args: str):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        return CliRunner().invoke(cli, ["cook", *args])


def test_uniform_soup_statistics_equal_update_bn_by_hand(bn_study):
    work, paths, root = bn_study
    result = cook(work, "--uniform", "-o", "u.safetensors", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "batchnorm:" in result.output and "re-estimated" in result.output
    soup = read_checkpoint(work / "u.safetensors")
    record = soup.meta["bn_reset"]
    saved = soup.state_dict()
    assert record["split"] == "train" and record["images"] == len(record["files"]) > 0
    assert record["layers"] and len(record["layers"]) == record["of_layers"]
    # Never the selection split: every recorded file is a train image, none a val one.
    assert all((root / "train_images" / f).is_file() for f in record["files"])
    # The weights are the plain mean; the statistics are update_bn's on those weights, exactly.
    mean = mean_of(paths)
    for key, value in saved.items():
        if not key.endswith(STATS):
            assert torch.allclose(value, mean[key], atol=1e-6), key
    expected = with_bn_reset(soup, saved)
    bn_keys = [k for k in saved if k.endswith(STATS)]
    assert bn_keys
    for key in bn_keys:
        assert torch.equal(saved[key], expected[key].to(saved[key].dtype)), key
        if key.endswith("running_var"):  # not the averaged statistics any more
            assert not torch.equal(saved[key], mean[key]), key
    # The figure cooking recorded is a plain evaluation of the saved weights.
    assert soup.meta["selection"]["top1"] == plain_top1(soup)


def test_greedy_selection_scores_the_reset_weights(bn_study):
    work, paths, root = bn_study
    result = cook(work, "--greedy", "-o", "g.safetensors", "--overwrite")
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(work / "g.safetensors")
    by_name = {read_checkpoint(p).name: p for p in paths}
    kept: list[Path] = []
    tried_mixes = 0
    for step in soup.meta["steps"]:
        trial = kept + [by_name[step["candidate"]]]
        if len(trial) == 1:  # one ingredient alone is scored as it is
            expected = plain_top1(read_checkpoint(trial[0]))
        else:
            tried_mixes += 1
            expected = plain_top1(soup, with_bn_reset(soup, mean_of(trial)))
        assert step["top1"] == expected, step
        if step["kept"]:
            kept = trial
    assert tried_mixes == len(paths) - 1
    assert soup.meta["selection"]["top1"] == plain_top1(soup)
    # soup eval reads the same figure from the written file, cached or not.
    for extra in ([], ["--no-cache"]):
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(work)
            out = CliRunner().invoke(cli, ["eval", "g.safetensors", "--json", "--bootstrap", "0", *extra])
        assert out.exit_code == 0, out.output
        [row] = json.loads(out.output)
        assert row["top1"] == soup.meta["selection"]["top1"], extra


def test_no_bn_reset_keeps_the_averaged_statistics(bn_study):
    work, paths, _ = bn_study
    result = cook(work, "--uniform", "-o", "plain.safetensors", "--overwrite", "--no-bn-reset")
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(work / "plain.safetensors")
    mean = mean_of(paths)
    saved = soup.state_dict()
    for key in saved:
        if key.endswith("running_var"):
            assert torch.allclose(saved[key], mean[key], atol=1e-6), key
    assert soup.meta["bn_reset"] == {"off": True, "layers": []}


def test_the_reset_is_deterministic(bn_study):
    work, _, _ = bn_study
    for name in ("a.safetensors", "b.safetensors"):
        assert cook(work, "--stock", "-o", name, "--overwrite").exit_code == 0
    a, b = read_checkpoint(work / "a.safetensors"), read_checkpoint(work / "b.safetensors")
    assert a.meta["bn_reset"]["layers"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bn_images_picks_a_seeded_subset(bn_study):
    work, _, _ = bn_study
    result = cook(work, "--uniform", "-o", "few.safetensors", "--overwrite", "--bn-images", "5")
    assert result.exit_code == 0, result.output
    record = read_checkpoint(work / "few.safetensors").meta["bn_reset"]
    assert record["images"] == 5 and len(record["files"]) == 5 and record["requested"] == 5


@pytest.mark.parametrize("value", ["0", "-3", "1"])
def test_bad_bn_images_is_one_line(bn_study, value):
    """One image has no train-mode BatchNorm statistics (a 1x1 map or a vector fails): at least 2."""
    work, _, _ = bn_study
    one_error_line(cook(work, "--uniform", "-o", "x.safetensors", "--bn-images", value), "--bn-images", "at least 2")
    assert not (work / "x.safetensors").exists()


@pytest.mark.parametrize("flag", ["--no-bn-reset", "--no-eval"])
def test_bn_images_with_no_bn_reset_or_no_eval_is_a_contradiction(bn_study, flag):
    """Refused, not warned about: either flag measures no statistics, so the count asked for would be ignored."""
    work, _, _ = bn_study
    one_error_line(cook(work, "--uniform", "-o", "x.safetensors", "--bn-images", "5", flag),
                   f"--bn-images 5 and {flag} contradict")
    assert not (work / "x.safetensors").exists()


def test_no_batch_of_one_image_is_left_over(bn_study, monkeypatch):
    """5 images in batches of 4 would leave one alone: batches of 3 and 2 instead, recorded, and update_bn on
    the recorded batches gives the same statistics."""
    work, _, _ = bn_study
    real = batchnorm.StatsReset
    monkeypatch.setattr(soup.cook.selector, "StatsReset",
                        lambda model, members, data, device, images, batch_size, *rest:
                        real(model, members, data, device, images, 4, *rest))
    result = cook(work, "--uniform", "-o", "five.safetensors", "--overwrite", "--bn-images", "5")
    assert result.exit_code == 0, result.output
    soup_file = read_checkpoint(work / "five.safetensors")
    assert soup_file.meta["bn_reset"]["batch_size"] == 3 and soup_file.meta["bn_reset"]["images"] == 5
    saved = soup_file.state_dict()
    expected = with_bn_reset(soup_file, saved)
    assert all(torch.equal(saved[k], expected[k].to(saved[k].dtype)) for k in saved if k.endswith(STATS))


def one_class_root(folder: Path, source: Path, train: int) -> Path:
    """A data root of one class (circle) with `train` train images and every val image of that class."""
    for split, count in (("train_images", train), ("val_images", None)):
        (folder / split / "circle").mkdir(parents=True)
        for image in sorted((source / split / "circle").iterdir())[:count]:
            shutil.copy(image, folder / split / "circle" / image.name)
    return folder


def test_a_train_split_of_one_image_is_one_line_in_training_and_in_the_reset(tmp_path, small_sketch_root):
    one = one_class_root(tmp_path / "one", small_sketch_root, 1)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(one)))
    one_error_line(CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "a")]),
                   "a batch of one image", "train.batch_size")
    # Ingredients trained on two images, cooked with a data root that holds one.
    work = tmp_path / "two"
    work.mkdir()
    run_study(work, tiny_recipe(one_class_root(tmp_path / "two_root", small_sketch_root, 2),
                                sweep={"train.seed": [0, 1]}))
    result = cook(work, "--uniform", "-o", "s.safetensors", "--data", str(one))
    one_error_line(result, "train split holds 1 image", "--no-bn-reset")
    assert not (work / "s.safetensors").exists()


def test_one_ingredient_alone_is_kept_as_it_is(bn_study):
    """A greedy soup that keeps one member is that ingredient, statistics included: nothing to re-estimate."""
    work, paths, _ = bn_study
    result = cook(work, "--greedy", str(paths[0]), "-o", "one.safetensors", "--overwrite")
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(work / "one.safetensors")
    ingredient = read_checkpoint(paths[0]).state_dict()
    saved = soup.state_dict()
    assert all(torch.equal(saved[k], ingredient[k].to(saved[k].dtype)) for k in saved)
    assert soup.meta["bn_reset"]["layers"] == []


def test_a_model_without_batchnorm_gives_the_same_soup_bytes(tmp_path, small_sketch_root):
    """timm's norm-free test network: no running statistics, so the reset changes nothing and costs nothing."""
    recipe = tiny_recipe(small_sketch_root, model={"backbone": "timm:test_nfnet", "pretrained": False},
                         sweep={"train.seed": [0, 1]})
    run_study(tmp_path, recipe)
    for name, extra in (("on.safetensors", []), ("off.safetensors", ["--no-bn-reset"])):
        result = cook(tmp_path, "--greedy", "-o", name, *extra)
        assert result.exit_code == 0, result.output
        assert "batchnorm" not in result.output
    assert (tmp_path / "on.safetensors").read_bytes() == (tmp_path / "off.safetensors").read_bytes()
    assert "bn_reset" not in read_checkpoint(tmp_path / "on.safetensors").meta


def test_freeze_bn_keeps_the_start_statistics_and_soups_keep_them(tmp_path, small_sketch_root):
    recipe = tiny_recipe(small_sketch_root, model={"freeze_bn": True}, sweep={"train.seed": [0, 1]})
    run_study(tmp_path, recipe)
    ingredients = find_checkpoints([tmp_path / "checkpoints" / "tiny"], kinds={"ingredient"})
    assert [c.recipe["model"]["freeze_bn"] for c in ingredients] == [True, True]
    built = recipe_from_dict(ingredients[0].recipe)  # the init_seed start every ingredient shares
    start = build_model(built.model, ingredients[0].classes, built.data.image_size).state_dict()
    states = [c.state_dict() for c in ingredients]
    stat_keys = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stat_keys
    for key in stat_keys:
        assert all(torch.equal(s[key], start[key]) for s in states), key
    weights = [k for k in start if k.endswith(".weight")]
    assert any(not torch.equal(states[0][k], start[k]) for k in weights)  # the weights did train
    result = cook(tmp_path, "--uniform", "-o", "u.safetensors")
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(tmp_path / "u.safetensors")
    assert soup.meta["bn_reset"]["layers"] == []
    saved = soup.state_dict()
    assert all(torch.equal(saved[k], start[k]) for k in stat_keys)


def test_a_frozen_part_shares_statistics_only_with_freeze_bn(tmp_path, small_sketch_root):
    """docs/cooking.md: model.freeze freezes weights, not statistics; the frozen part's BatchNorm layers
    update their running statistics on each ingredient's batches, so a soup re-estimates them, and each
    re-estimated layer's num_batches_tracked is the number of batches of the reset's pass."""
    recipe = tiny_recipe(small_sketch_root, model={"freeze": 0.5}, sweep={"train.seed": [0, 1]})
    run_study(tmp_path, recipe)
    ingredients = find_checkpoints([tmp_path / "checkpoints" / "tiny"], kinds={"ingredient"})
    built = recipe_from_dict(ingredients[0].recipe)
    model = build_model(built.model, ingredients[0].classes, built.data.image_size)
    freeze_prefix(model.backbone, built.model.freeze)
    frozen = [name for name, layer in batchnorm.batchnorm_layers(model).items() if not layer.weight.requires_grad]
    assert frozen
    a, b = (c.state_dict() for c in ingredients)
    assert all(torch.equal(a[f"{name}.weight"], b[f"{name}.weight"]) for name in frozen)  # frozen weights
    assert any(not torch.equal(a[f"{name}.running_mean"], b[f"{name}.running_mean"]) for name in frozen)
    result = cook(tmp_path, "--uniform", "-o", "u.safetensors")
    assert result.exit_code == 0, result.output
    soup = read_checkpoint(tmp_path / "u.safetensors")
    record = soup.meta["bn_reset"]
    differing = [n for n in frozen if not torch.equal(a[f"{n}.running_mean"], b[f"{n}.running_mean"])]
    assert set(differing) <= set(record["layers"])
    batches = -(-record["images"] // record["batch_size"])
    saved = soup.state_dict()
    assert all(saved[f"{name}.num_batches_tracked"].item() == batches for name in record["layers"])


def test_freeze_bn_is_validated(tmp_path, small_sketch_root):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(small_sketch_root, model={"freeze_bn": "yes"})))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        one_error_line(CliRunner().invoke(cli, ["train", "r.yaml"]), "model.freeze_bn")


def test_inspect_the_report_and_the_model_card_say_how_the_statistics_were_made(bn_study):
    work, _, _ = bn_study
    assert cook(work, "--uniform", "-o", "shown.safetensors", "--overwrite").exit_code == 0
    layers = len(read_checkpoint(work / "shown.safetensors").meta["bn_reset"]["layers"])
    said = f"BatchNorm statistics: {layers} of {layers} layers re-estimated on"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        inspected = CliRunner().invoke(cli, ["inspect", "shown.safetensors"])
        exported = CliRunner().invoke(cli, ["export", "shown.safetensors", "exported"])
        reported = CliRunner().invoke(cli, ["report", "shown.safetensors", "-o", "shown.html"])
    assert inspected.exit_code == 0, inspected.output
    assert said in " ".join(inspected.output.split())
    assert exported.exit_code == 0, exported.output
    assert said in (work / "exported" / "README.md").read_text(encoding="utf-8")
    assert reported.exit_code == 0, reported.output
    assert said in (work / "shown.html").read_text(encoding="utf-8")


def test_without_a_train_store_only_the_chosen_images_are_decoded(tmp_path, small_sketch_root, monkeypatch,
                                                                   fresh_caches):
    """Trained with --no-cache, no store of train_images exists: the reset decodes its images alone (never
    the whole folder's store), with the same bytes, so update_bn by hand still agrees exactly."""
    root = tmp_path / "data"
    shutil.copytree(small_sketch_root, root)
    monkeypatch.setenv("SOUP_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tiny_recipe(root, train={"epochs": 2}, sweep={"train.seed": [0, 1]})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["train", "r.yaml", "--no-cache"]).exit_code == 0
    decoded, real = [], batchnorm.decoded_rows
    monkeypatch.setattr(batchnorm, "decoded_rows", lambda folder, size, rows, *a: decoded.append(len(rows))
                        or real(folder, size, rows, *a))
    result = CliRunner().invoke(cli, ["cook", "--uniform", "-o", "u.safetensors", "--bn-images", "10"])
    assert decoded == [10]
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "cache").glob("decoded-train_images-*")), "the reset built the train store"
    soup = read_checkpoint(tmp_path / "u.safetensors")
    saved = soup.state_dict()
    expected = with_bn_reset(soup, saved)
    assert soup.meta["bn_reset"]["images"] == 10 and soup.meta["bn_reset"]["layers"]
    assert all(torch.equal(saved[k], expected[k]) for k in saved if k.endswith(STATS))
