"""Regressions from the outside audit (issue 10): cooking, outputs, trust in checkpoint metadata, odd files."""

import re

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch.utils.data import DataLoader

from soup.backbones import build_model
from soup.checkpoint import read_checkpoint
from soup.cli import cli
from soup.cook import weighted_average
from soup.data import load_split
from soup.recipe import recipe_from_dict

from conftest import tiny_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sketch_root):
    """Two tiny ResNet ingredients (BatchNorm: integer buffers) under <work>/checkpoints/tiny/."""
    work = tmp_path_factory.mktemp("audit")
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe(sketch_root, sweep={"train.seed": [0, 1]})))
    result = CliRunner().invoke(cli, ["train", str(work / "tiny.yaml"), "--out", str(work / "checkpoints")])
    assert result.exit_code == 0, result.output
    return work


def ingredient_path(work, index=0):
    return sorted((work / "checkpoints" / "tiny").glob("*/model.safetensors"))[index]


def one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


# High 1: never mutate an input ----------------------------------------------------------------------------

def test_weighted_average_leaves_in_memory_members_alone():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    mixed = weighted_average([(a, 0.25), (b, 0.75)])
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0])) and torch.equal(b["w"], torch.tensor([3.0, 6.0]))
    assert torch.allclose(mixed["w"], torch.tensor([2.5, 5.0]))
    mixed["n"] += 1
    assert a["n"].item() == 3


def _accuracy(model, loader, state):
    model.load_state_dict(state)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, targets in loader:
            correct += (model(images).argmax(dim=1) == targets).sum().item()
            total += len(targets)
    return correct / total


def test_interpolate_from_the_start_writes_and_scores_exactly_the_named_soup(trained, tmp_path):
    b_path = ingredient_path(trained)
    out = tmp_path / "wise.safetensors"
    result = CliRunner().invoke(cli, ["cook", "--interpolate", str(b_path), "--alpha", "0:1:0.25", "-o", str(out)])
    assert result.exit_code == 0, result.output

    # Independently: the start as training built it, B, their mixes, and plain val accuracy.
    b = read_checkpoint(b_path)
    recipe = recipe_from_dict(b.recipe)
    model = build_model(recipe.model, b.classes, recipe.data.image_size)
    theta_b = b.state_dict()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    start.update({k: v for k, v in theta_b.items() if k.startswith("head.")})  # WiSE-FT keeps B's head

    def mix(alpha):
        return {k: ((1 - alpha) * start[k] + alpha * theta_b[k]) if start[k].is_floating_point()
                else (start[k] if alpha <= 0.5 else theta_b[k]) for k in start}

    loader = DataLoader(load_split(recipe.data, "val", classes=b.classes), batch_size=64)
    printed = dict(re.findall(r"alpha ([\d.]+) \(start -> [^)]*\): ([\d.]+%) on val", result.output))
    assert len(printed) == 5, result.output
    for alpha, shown in printed.items():
        assert shown == f"{_accuracy(model, loader, mix(float(alpha))):.2%}", (alpha, result.output)

    soup = read_checkpoint(out)
    alpha = soup.meta["interpolation"]["alpha"]
    written = soup.state_dict()
    expected = mix(alpha)
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(written[key].to(value.dtype), value, rtol=0, atol=1e-6), key
    final = re.search(r"interpolate soup: ([\d.]+%) on val", result.output).group(1)
    assert final == f"{_accuracy(model, loader, written):.2%}" == printed[f"{alpha:g}"]
