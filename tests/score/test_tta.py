"""Issue 20 part 4: test-time augmentation in `soup eval` and `soup submit`; the cached figures equal the
plain ones, and both equal the mean of logits over the views computed by hand."""

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import ImageOps
from torchvision import transforms

from soup.cli import cli
from soup.data import folders
from soup.fast import scorer as fast_scorer
from soup.fast.prefix import prefix_features
from soup.data.folders import build_transform, load_split
from soup.models.backbones import model_from_checkpoint
from soup.models.checkpoint import read_checkpoint
from soup.models.inference import make_loader, predict
from soup.models.metrics import scores
from soup.models.views import views_of
from soup.recipe.spec import recipe_from_dict

from conftest import ingredient_path, one_error_line, run_study, tiny_recipe, tiny_vit_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vit_work(tmp_path_factory, small_sketch_root):
    """One ViT ingredient with a frozen prefix, trained through the CLI (its val passes use the prefix cache)."""
    work = tmp_path_factory.mktemp("tta")
    recipe = tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.5), data={"image_size": 28},
                         train={"epochs": 1, "lr": 5e-3})
    [trained] = run_study(work, recipe)
    assert "prefix cache" in trained  # the path under test
    return work


def mirrored(cfg) -> transforms.Compose:
    """The plain transform with the resized PIL image mirrored before ToTensor."""
    steps = build_transform(cfg).transforms
    return transforms.Compose([steps[0], transforms.Lambda(ImageOps.mirror), *steps[1:]])


def with_transform(dataset, transform):
    dataset.transform = transform
    return dataset


def by_hand(checkpoint, dataset_of) -> tuple[torch.Tensor, list]:
    """The mean of the model's logits on each image and on its mirror, from two plain loaders."""
    model = model_from_checkpoint(checkpoint)
    model.load_state_dict(checkpoint.state_dict())
    cfg = recipe_from_dict(checkpoint.recipe).data
    logits, labels = predict(model, make_loader(dataset_of(build_transform(cfg)), 128, 0, CPU), CPU)
    mirror, mirror_labels = predict(model, make_loader(dataset_of(mirrored(cfg)), 128, 0, CPU), CPU)
    assert labels == mirror_labels and not torch.equal(logits, mirror)
    return (logits + mirror) / 2, labels


@pytest.mark.parametrize("tta", ["flip", "flip,crops"])
def test_soup_eval_tta_equals_no_cache_field_for_field(vit_work, monkeypatch, tta):
    monkeypatch.chdir(vit_work)
    built = []

    def recording(*args, **kwargs):
        features = prefix_features(*args, **kwargs)
        built.append((args[-1], features is not None))
        return features

    monkeypatch.setattr(fast_scorer, "prefix_features", recording)
    runner = CliRunner()
    cached = runner.invoke(cli, ["eval", "--json", "--tta", tta])
    assert built == [(None, True)] + [(view, True) for view in views_of(tta)[1:]]  # every view from tokens
    plain = runner.invoke(cli, ["eval", "--json", "--tta", tta, "--no-cache"])
    assert cached.exit_code == 0 and plain.exit_code == 0, cached.output + plain.output
    rows = json.loads(cached.output)
    assert rows == json.loads(plain.output)
    assert [(r["tta"], r["kind"]) for r in rows] == [(None, "ingredient"), (tta, "ingredient")]
    assert rows[1]["name"] == f"{rows[0]['name']} +tta {tta}"
    # Beside its plain row, on the same images: a paired difference.
    assert rows[1]["compare"]["ref"] == rows[0]["name"] and rows[1]["compare"]["p"] is not None
    assert rows[1]["compare"]["diff"] == rows[1]["top1"] - rows[0]["top1"]


def test_flip_tta_row_is_the_mean_of_logits_on_the_image_and_its_mirror(vit_work, monkeypatch):
    monkeypatch.chdir(vit_work)
    result = CliRunner().invoke(cli, ["eval", "--json", "--tta", "flip", "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    plain_row, tta_row = json.loads(result.output)
    checkpoint = read_checkpoint(ingredient_path(vit_work))
    cfg = recipe_from_dict(checkpoint.recipe).data
    logits, targets = by_hand(checkpoint, lambda t: with_transform(load_split(cfg, "val",
                                                                              classes=checkpoint.classes), t))
    expected = scores(logits, targets)
    assert (tta_row["top1"], tta_row["top5"]) == (expected["top1"], expected["top5"])
    assert tta_row["nll"] == pytest.approx(expected["loss"], rel=1e-6)


def test_submit_tta_predicts_the_argmax_of_the_mean_and_records_it(vit_work, monkeypatch):
    monkeypatch.chdir(vit_work)
    path = str(ingredient_path(vit_work))
    result = CliRunner().invoke(cli, ["submit", path, "--tta", "flip", "-o", "tta.csv"])
    assert result.exit_code == 0, result.output
    checkpoint = read_checkpoint(path)
    root = recipe_from_dict(checkpoint.recipe).data.root
    logits, ids = by_hand(checkpoint, lambda t: folders.TestImages(root, t))
    with open("tta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["Id"] for r in rows] == ids
    assert [int(r["Category"]) for r in rows] == logits.argmax(dim=1).tolist()
    assert json.loads(open("tta.csv.json").read())["tta"] == "flip"
    result = CliRunner().invoke(cli, ["submit", path, "-o", "plain.csv"])
    assert result.exit_code == 0, result.output
    assert json.loads(open("plain.csv.json").read())["tta"] is None


@pytest.mark.parametrize("command", ["eval", "submit"])
def test_an_unknown_tta_is_one_line_listing_the_choices(vit_work, monkeypatch, command):
    monkeypatch.chdir(vit_work)
    result = CliRunner().invoke(cli, [command, str(ingredient_path(vit_work)), "--tta", "rotate"])
    one_error_line(result, "--tta rotate", "flip, flip,crops")
