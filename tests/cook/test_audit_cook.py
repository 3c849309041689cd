"""Regressions from the outside audit (issue 10): cooking, outputs, trust in checkpoint metadata, odd files."""

import json
import os
import re
import shutil

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from soup.cli import cli
from soup.cook.weights import weighted_average
from soup.data.folders import load_split
from soup.errors import SoupError
from soup.models.backbones import build_model, fingerprint
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.recipe.spec import ModelConfig, recipe_from_dict

from conftest import CLASSES, HUBCONF, ingredient_path, one_error_line, tiny_recipe, with_bn_reset


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sketch_root):
    """Two tiny ResNet ingredients (BatchNorm: integer buffers) under <work>/checkpoints/tiny/."""
    work = tmp_path_factory.mktemp("audit")
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe(sketch_root, sweep={"train.seed": [0, 1]})))
    result = CliRunner().invoke(cli, ["train", str(work / "tiny.yaml"), "--out", str(work / "checkpoints")])
    assert result.exit_code == 0, result.output
    return work




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
    # One line names the path and every alpha's figure (rich may wrap it): "... on val: alpha 0 25.00%, ..."
    sweep = re.search(r"\(start -> [^)]*\) on val: (.*?); best alpha", " ".join(result.output.split()))
    printed = dict(re.findall(r"alpha ([\d.]+) ([\d.]+%)", sweep.group(1))) if sweep else {}
    assert len(printed) == 5, result.output
    soup = read_checkpoint(out)

    def reset(alpha):  # the endpoints are the start and B as they are; a mix gets BatchNorm statistics of its own
        return mix(alpha) if alpha in (0, 1) else with_bn_reset(soup, mix(alpha))

    for alpha, shown in printed.items():
        assert shown == f"{_accuracy(model, loader, reset(float(alpha))):.2%}", (alpha, result.output)

    alpha = soup.meta["interpolation"]["alpha"]
    written = soup.state_dict()
    expected = reset(alpha)
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(written[key].to(value.dtype), value, rtol=0, atol=1e-6), key
    final = re.search(r": ([\d.]+%) on val \(the selection set\)", " ".join(result.output.split())).group(1)
    assert final == f"{_accuracy(model, loader, written):.2%}" == printed[f"{alpha:g}"]


# High 3: a checkpoint's metadata never chooses code to run ---------------------------------------------

MARKER = "RAN"  # written by the hub code below whenever it is imported


@pytest.fixture
def hub_checkpoints(tmp_path, small_sketch_root, hub_dir):
    """Two checkpoints of the conftest hub model whose metadata names `evil`, a copy of that hub code that
    also leaves a marker file when run."""
    evil = tmp_path / "evil_hub"
    evil.mkdir()
    (evil / "hubconf.py").write_text(HUBCONF + f"\nimport pathlib\npathlib.Path(__file__).with_name({MARKER!r}).touch()\n")
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, data={"image_size": 28}, model={
        "backbone": f"hub:{hub_dir}:tiny_dinov2", "pretrained": False, "kwargs": {"img_size": 28}}))
    model = build_model(recipe.model, CLASSES, 28)  # the user's own, trusted copy of the code
    recorded = recipe.to_dict()
    recorded["model"]["backbone"] = f"hub:{evil}:tiny_dinov2"
    meta = {"kind": "ingredient", "name": "hubby", "recipe": recorded, "backbone": recorded["model"]["backbone"],
            "classes": CLASSES, "start_fingerprint": fingerprint(model)}
    paths = []
    for i in range(2):
        state = {k: v + 0.01 * (i + 1) * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        paths.append(save_checkpoint(tmp_path / "hubby" / f"{i}" / "model.safetensors", state, {**meta, "id": str(i)}))
    return evil, paths


@pytest.mark.parametrize("command", [
    ["eval"], ["submit", "-o", "{tmp}/s.csv"], ["inspect", "--line", "{a}", "{b}"],
    ["cook", "--stock", "--no-eval", "-o", "{tmp}/stock.safetensors"], ["cook", "-o", "{tmp}/u.safetensors"]])
def test_untrusted_hub_code_named_by_a_checkpoint_never_runs(hub_checkpoints, tmp_path, command):
    evil, (a, b) = hub_checkpoints
    args = [part.format(tmp=tmp_path, a=a, b=b) for part in command]
    paths = [str(a)] if command[0] in ("eval", "submit") else [str(a), str(b)]
    result = CliRunner().invoke(cli, args + paths)
    one_error_line(result, "hub:" + str(evil) + ":tiny_dinov2", f"--trust-hub {evil}", "model.safetensors")
    assert not (evil / MARKER).exists()
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob("*.safetensors"))


def test_inspect_without_trust_reports_distances_only(hub_checkpoints):
    evil, paths = hub_checkpoints
    result = CliRunner().invoke(cli, ["inspect", *map(str, paths)])
    assert result.exit_code == 0, result.output
    assert "not rebuilt" in result.output and "--trust-hub" in result.output
    assert not (evil / MARKER).exists()


def test_trusted_hub_code_runs(hub_checkpoints, tmp_path):
    evil, paths = hub_checkpoints
    result = CliRunner().invoke(cli, ["eval", str(paths[0]), "--trust-hub", str(evil)])
    assert result.exit_code == 0, result.output
    assert (evil / MARKER).exists() and "hubby/0" in result.output
    result = CliRunner().invoke(cli, ["cook", "--stock", "--no-eval", *map(str, paths), "--trust-hub", str(evil),
                                      "-o", str(tmp_path / "stock.safetensors")])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "stock.safetensors").kind == "stock"


def test_github_hub_named_by_a_checkpoint_only_from_the_hub_cache(hub_checkpoints, tmp_path, monkeypatch):
    _, paths = hub_checkpoints
    checkpoint = read_checkpoint(paths[0])
    recorded = {**checkpoint.recipe, "model": {**checkpoint.recipe["model"], "backbone": "hub:someone/tiny:tiny_dinov2"}}
    path = save_checkpoint(tmp_path / "gh.safetensors", checkpoint.state_dict(),
                           {**checkpoint.meta, "recipe": recorded, "backbone": "hub:someone/tiny:tiny_dinov2"})
    cache = tmp_path / "torch_hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache))
    # Not cached: refused without a download (the no_network fixture fails any connection).
    one_error_line(CliRunner().invoke(cli, ["eval", str(path)]), "hub:someone/tiny:tiny_dinov2",
                   "--trust-hub someone/tiny", "gh.safetensors")
    (cache / "someone_tiny_main").mkdir(parents=True)
    (cache / "someone_tiny_main" / "hubconf.py").write_text(HUBCONF)  # what an earlier torch.hub.load left
    result = CliRunner().invoke(cli, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    assert "hubby/0" in result.output and "25.00%" not in result.stderr


# model.weights: files that do not fit, or are not weights at all -----------------------------------------

def test_timm_weights_must_fit_the_backbone(tmp_path):
    other = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=28, depth=1, embed_dim=32,
                              num_heads=2)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "vit.safetensors")
    cfg = ModelConfig(backbone="timm:test_resnet", weights=str(tmp_path / "vit.safetensors"))
    with pytest.raises(SoupError, match=r"model.weights: .*vit.safetensors does not fit timm:test_resnet .*Missing") as err:
        build_model(cfg, CLASSES, 32)
    assert "\n" not in str(err.value)
    # A timm file with its own classifier (1000 classes here) fits: the classifier is left out.
    donor = timm.create_model("test_resnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, tmp_path / "resnet.safetensors")
    loaded = build_model(ModelConfig(backbone="timm:test_resnet", weights=str(tmp_path / "resnet.safetensors")),
                         CLASSES, 32)
    for key, value in loaded.backbone.state_dict().items():
        assert torch.equal(value, donor.state_dict()[key]), key


class MarkerOnLoad:
    """Unpickling this (torch.load without weights_only) would create a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("backbone", ["timm:test_resnet", "hub"])
@pytest.mark.parametrize("content", ["pickle", "truncated", "garbage"])
def test_bad_weights_files_are_one_line_and_never_run(small_sketch_root, tmp_path, hub_dir, backbone, content):
    weights, marker = tmp_path / "start.pth", tmp_path / "PWNED"
    torch.save({"w": torch.ones(3), "x": MarkerOnLoad(marker)}, weights)
    if content == "truncated":
        torch.save({"w": torch.ones(1000)}, weights)
        weights.write_bytes(weights.read_bytes()[:-300])
    elif content == "garbage":
        weights.write_bytes(b"not weights at all")
    model = {"backbone": "timm:test_resnet", "weights": str(weights)}
    if backbone == "hub":
        model = {"backbone": f"hub:{hub_dir}:tiny_dinov2", "weights": str(weights), "kwargs": {"img_size": 28}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(small_sketch_root, model=model)))
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    one_error_line(result, "model.weights", "start.pth")
    assert not marker.exists()


# High 2: outputs never silently replace anything -----------------------------------------------------------

@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """A fresh working folder holding a copy of the trained checkpoints/, as the current directory."""
    shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cooking_again_into_an_existing_soup_needs_overwrite(work):
    runner = CliRunner()
    assert runner.invoke(cli, ["cook", "--greedy"]).exit_code == 0
    soup = work / "checkpoints" / "soups" / "greedy.safetensors"
    before = soup.read_bytes()
    again = runner.invoke(cli, ["cook", "--greedy"])
    one_error_line(again, "checkpoints/soups/greedy.safetensors exists", "--overwrite", "-o")
    assert "greedy: start from" not in again.output  # refused before any work
    assert soup.read_bytes() == before
    replaced = runner.invoke(cli, ["cook", "--greedy", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert read_checkpoint(soup).kind == "greedy"


def test_cook_never_writes_over_its_inputs_or_an_ingredient(work):
    a, b = ingredient_path(work, 0), ingredient_path(work, 1)
    before = b.read_bytes()
    for target, message in [(b, "one of this command's inputs"), (a.parent / "soup.safetensors", "ingredient folder")]:
        result = CliRunner().invoke(cli, ["cook", "--no-eval", str(a), str(b), "-o", str(target), "--overwrite"])
        one_error_line(result, str(target), message)
    shutil.copy(b, work / "copy.safetensors")  # an ingredient outside its folder is still an ingredient
    result = CliRunner().invoke(cli, ["cook", "--no-eval", str(a), "-o", "copy.safetensors", "--overwrite"])
    one_error_line(result, "copy.safetensors is an ingredient checkpoint")
    assert b.read_bytes() == before == (work / "copy.safetensors").read_bytes()
    assert not (a.parent / "soup.safetensors").exists()


def test_submit_never_writes_over_a_checkpoint_and_asks_before_replacing(work):
    a = ingredient_path(work)
    runner = CliRunner()
    assert runner.invoke(cli, ["cook", "--no-eval", str(a), "-o", "soup.safetensors"]).exit_code == 0
    checkpoints = {p: p.read_bytes() for p in [a, work / "soup.safetensors"]}
    for target, message in [(a, "one of this command's inputs"), ("soup.safetensors", "checkpoint or weights path"),
                            ("new.safetensors", "checkpoint or weights path"), (a.parent / "s.csv", "ingredient folder")]:
        result = runner.invoke(cli, ["submit", str(a), "-o", str(target), "--overwrite"])
        one_error_line(result, str(target), message)
    assert all(p.read_bytes() == content for p, content in checkpoints.items())
    assert not (work / "new.safetensors").exists() and not (a.parent / "s.csv").exists()

    assert runner.invoke(cli, ["submit", str(a)]).exit_code == 0
    (work / "submission.csv").write_text("mine\n")
    one_error_line(runner.invoke(cli, ["submit", str(a)]), "submission.csv exists", "--overwrite", "-o")
    assert (work / "submission.csv").read_text() == "mine\n"
    result = runner.invoke(cli, ["submit", str(a), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (work / "submission.csv").read_text().startswith("Id,Category\n")


# Low: odd names and files -------------------------------------------------------------------------------

def test_a_test_image_name_that_is_not_utf8_keeps_its_bytes_in_the_csv(trained, small_sketch_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_sketch_root, root)
    folder = root / "test_images" / "mistery_category"
    first = sorted(folder.iterdir())[0]
    os.rename(bytes(first), os.fsencode(folder) + b"/img_\xff\xfe" + os.fsencode(first.suffix))
    result = CliRunner().invoke(cli, ["submit", str(ingredient_path(trained)), "--data", str(root),
                                      "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "s.csv").read_bytes().split(b"\r\n")
    assert lines[0] == b"Id,Category" and len([line for line in lines[1:] if line]) == len(list(folder.iterdir()))
    assert any(line.startswith(b"img_\xff\xfe,") for line in lines)


@pytest.mark.parametrize("raw,message", [
    ("[1, 2]", "not a JSON object"), ("42", "not a JSON object"),
    ('"classes backbone start_fingerprint recipe"', "not a JSON object"),
    ('{"classes": 5, "backbone": "b", "start_fingerprint": "f", "recipe": {}}', "wrong type in classes"),
    ('{"classes": ["a"], "backbone": "b", "start_fingerprint": "f", "recipe": [], "kind": 3}',
     "wrong type in recipe, kind"),
])
def test_soup_metadata_that_is_not_an_object_is_one_line(trained, tmp_path, raw, message):
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.ones(2)}, bad, metadata={"soup": raw})
    result = CliRunner().invoke(cli, ["cook", "--no-eval", str(ingredient_path(trained)), str(bad),
                                      "-o", str(tmp_path / "s.safetensors")])
    one_error_line(result, f"{bad}: soup metadata", message, "damaged")


def test_a_damaged_ingredient_in_a_folder_is_named_and_the_rest_cooked(work):
    damaged = ingredient_path(work, 1)
    damaged.write_bytes(damaged.read_bytes()[:-500])
    result = CliRunner().invoke(cli, ["cook", "--no-eval", "checkpoints/tiny", "-o", "u.safetensors"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "warning: skipped checkpoints/tiny/01-seed1/model.safetensors: not a readable safetensors file" in flat
    assert [m["name"] for m in read_checkpoint(work / "u.safetensors").meta["members"]] == ["tiny/00-seed0"]
    result = CliRunner().invoke(cli, ["eval", "checkpoints"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "warning: skipped checkpoints/tiny/01-seed1/model.safetensors" in flat
    assert "ingredient ids: tiny/<index>-<settings> 00-seed0" in flat  # the row is 00, the legend names it


def test_only_soups_chosen_on_a_split_are_marked_as_measured_on_it(work):
    runner = CliRunner()
    b = str(ingredient_path(work, 1))
    cooks = {"uniform": ["--uniform"], "stock": ["--stock"], "greedy": ["--greedy"],
             "wise1": ["--interpolate", b, "--alpha", "0.5"], "wise": ["--interpolate", b, "--alpha", "0:1:0.5"]}
    for name, args in cooks.items():
        result = runner.invoke(cli, ["cook", *args, "-o", f"soups/{name}.safetensors"])
        assert result.exit_code == 0, result.output
        assert read_checkpoint(work / "soups" / f"{name}.safetensors").meta["selection"]["split"] == "val"
    rows = json.loads(runner.invoke(cli, ["eval", "soups", "--json"]).output)
    assert {row["name"]: row["selection_set"] for row in rows} == {
        "uniform": False, "stock": False, "greedy": True, "wise1": False, "wise": True}
