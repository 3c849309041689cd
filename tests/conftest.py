"""Shared fixtures: generated sketches, tiny models, a local torch.hub directory. Nothing touches the network."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from rich.console import Console
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset

import soup.cli.base
from soup.cli import cli
from soup.data.folders import build_transform, class_list, load_rgb, load_split
from soup.data.sketches import generate_sketches
from soup.fast import decoded as fast_decoded, prefix as fast_prefix
from soup.models.backbones import build_model, freeze_prefix, model_from_checkpoint
from soup.models.checkpoint import read_checkpoint
from soup.models.inference import evaluate, make_loader
from soup.recipe.spec import recipe_from_dict

CLASSES = ["circle", "cross", "square", "triangle"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def sketch_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sketches")
    generate_sketches(root, CLASSES, train_per_class=80, val_per_class=10, test_images=7, image_size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def small_sketch_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_sketches")
    generate_sketches(root, CLASSES, train_per_class=6, val_per_class=3, test_images=5, image_size=32, seed=3)
    return root


def tiny_recipe(root: Path, **sections) -> dict:
    """A recipe for a tiny timm ResNet on 32 px sketches: seconds on a CPU."""
    recipe = {
        "name": "tiny",
        "data": {"root": str(root), "image_size": 32},
        "model": {"backbone": "timm:test_resnet", "pretrained": False},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 2e-3, "amp": "off",
                  "num_workers": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


def tiny_vit_model(**extra) -> dict:
    """DinoV2's ViT architecture from timm, shrunk (same code path as ViT-B/14)."""
    return {"backbone": "timm:vit_small_patch14_dinov2", "pretrained": False,
            "kwargs": {"img_size": 28, "depth": 4, "embed_dim": 32, "num_heads": 2}, **extra}


def tiny_swin_model(**extra) -> dict:
    """timm's SwinV2 (the course's second backbone), shrunk: 32 px, 4 stages of widths 16-128 with 1, 1, 2
    and 2 blocks, windows of 4 patches; no drop-path, so a frozen prefix computes the same in train mode.
    freeze 0.75 cuts inside the last stage, after its first block."""
    kwargs = {"img_size": 32, "embed_dim": 16, "depths": [1, 1, 2, 2], "num_heads": [1, 1, 2, 2],
              "window_size": 4, "drop_path_rate": 0.0, **extra.pop("kwargs", {})}
    return {"backbone": "timm:swinv2_tiny_window8_256", "pretrained": False, "kwargs": kwargs, **extra}


def vit_setup(root, augment: str = "none", **kwargs):
    """(recipe, model, train set, val set) for a 4-block DinoV2-architecture ViT at 28 px, freeze 0.75 (its
    first 2 blocks frozen), ready for soup.fast.build.build_pipeline; `kwargs` go to the model."""
    model_cfg = tiny_vit_model(freeze=0.75, kwargs={"img_size": 28, "depth": 4, "embed_dim": 32, "num_heads": 2,
                                                    **kwargs})
    recipe = recipe_from_dict(tiny_recipe(root, model=model_cfg, data={"image_size": 28, "augment": augment},
                                          train={"batch_size": 8}))
    classes = class_list(root)
    train_set = load_split(recipe.data, "train", train=True, classes=classes)
    val_set = load_split(recipe.data, "val", classes=classes)
    model = build_model(recipe.model, classes, 28)
    freeze_prefix(model.backbone, recipe.model.freeze)
    return recipe, model, train_set, val_set


@pytest.fixture
def fresh_caches():
    """The in-process decoded-image and prefix-feature registries empty before and after the test."""
    fast_decoded._DECODED.clear()
    fast_prefix._FEATURES.clear()
    yield
    fast_decoded._DECODED.clear()
    fast_prefix._FEATURES.clear()


HUBCONF = textwrap.dedent('''
    """A local torch.hub repo whose entry point behaves like DinoV2's: features = normalised CLS token."""
    dependencies = ["torch", "timm"]

    import torch
    import timm


    class TinyDino(torch.nn.Module):
        def __init__(self, img_size=518, embed_dim=32, depth=2):
            super().__init__()
            self.vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                         img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=2,
                                         dynamic_img_size=True)
            self.embed_dim = embed_dim

        def forward(self, x):
            return self.vit.forward_features(x)[:, 0]


    def tiny_dinov2(pretrained=True, **kwargs):
        model = TinyDino(**kwargs)
        if pretrained:
            # What the real entry point does: fetch weights from the internet.
            state = torch.hub.load_state_dict_from_url("https://dl.fbaipublicfiles.com/tiny_dinov2.pth")
            model.load_state_dict(state)
        return model
''')


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hub") / "tiny_dinov2_repo"
    directory.mkdir()
    (directory / "hubconf.py").write_text(HUBCONF)
    return directory


@pytest.fixture
def make_recipe():
    def make(root, **sections):
        return recipe_from_dict(tiny_recipe(root, **sections))
    return make


def state_close(a: dict, b: dict, atol=0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def probed_start_by_hand(work: Path, checkpoint) -> dict:
    """The start of `checkpoint` (a recipe with model.probe trained under <work>/checkpoints/tiny/): the
    recipe's model with the probe's weights, built here without soup's own search for the probe."""
    [probe] = (work / "checkpoints" / "tiny").glob("probe-*/model.safetensors")
    recipe = recipe_from_dict(checkpoint.recipe)
    model = build_model(recipe.model, checkpoint.classes, recipe.data.image_size)
    model.load_state_dict(read_checkpoint(probe).state_dict())
    return {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def ingredient_path(work: Path, index: int = 0) -> Path:
    return sorted((work / "checkpoints" / "tiny").glob("*/model.safetensors"))[index]


def run_files(run_dir: Path) -> list[str]:
    """A run folder's file names, sorted, less TensorBoard's event files (soup.train.logs writes them there
    when tensorboard is installed)."""
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.out"))


def one_error_line(result, *fragments) -> None:
    """Exit 2 and one line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.output


def run_study(work: Path, recipe: dict, *commands: list[str]) -> list[str]:
    """Write `recipe` as <work>/r.yaml, then run `soup train r.yaml` and each of `commands` in `work` through
    the CLI, each required to exit 0; their outputs, in order."""
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    outputs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        for args in (["train", "r.yaml"], *commands):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
            outputs.append(result.output)
    return outputs


def invoke_with_console(args: list[str], monkeypatch, width: int):
    """`soup ARGS` through the CLI with soup's console swapped for one `width` columns wide, unhighlighted."""
    monkeypatch.setattr(soup.cli.base, "console", Console(width=width, highlight=False))
    return CliRunner().invoke(cli, args)


def plain_scores(checkpoint, state_dict=None, split="val") -> dict:
    """A plain evaluation: the whole model over a plain loader, as `soup eval --no-cache` runs it."""
    model = model_from_checkpoint(checkpoint)
    model.load_state_dict(state_dict if state_dict is not None else checkpoint.state_dict())
    recipe = recipe_from_dict(checkpoint.recipe)
    dataset = load_split(recipe.data, split, classes=checkpoint.classes)
    return evaluate(model, make_loader(dataset, 128, 0, CPU), CPU)


class RecordedImages(Dataset):
    """The train images a soup's bn_reset records, in the recorded order, with the evaluation transform."""

    def __init__(self, soup):
        recipe = recipe_from_dict(soup.recipe)
        folder = Path(recipe.data.root) / "train_images"
        self.paths = [folder / name for name in soup.meta["bn_reset"]["files"]]
        self.transform = build_transform(recipe.data)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_rgb(str(self.paths[i]))), 0


def with_bn_reset(soup, weights: dict) -> dict:
    """`weights` with the BatchNorm statistics torch.optim.swa_utils.update_bn measures for them on the images
    and batches `soup` records (soup.cook.batchnorm, recomputed independently); as they are without a record."""
    record = soup.meta.get("bn_reset")
    if not record or record.get("off"):
        return weights
    model = model_from_checkpoint(soup)
    model.load_state_dict(weights)
    update_bn(DataLoader(RecordedImages(soup), batch_size=record["batch_size"]), model)
    fresh = model.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    return {k: fresh[k].to(v.dtype) if k.endswith(stats) else v for k, v in weights.items()}


def plain_top1(checkpoint, state_dict=None, split="val") -> float:
    return plain_scores(checkpoint, state_dict, split)["top1"]
