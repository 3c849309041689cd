"""Backbone families (soup.models.families, issue 32 section 3): one description of each backbone's layout
serves the prefix cache, layer-wise lr decay, export and channels_last; SwinV2 gets the fast paths, and its
cached figures equal a plain evaluation of the saved weights exactly, as the ViT's do."""

import json

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from soup.cli import cli

from soup.fast.prefix import PrefixSplit, find_prefix, split_matches
from soup.models.backbones import build_model, freeze_prefix, model_from_checkpoint
from soup.models.checkpoint import read_checkpoint
from soup.models.families import FAMILIES, data_defaults, family_of, find_family, wants_channels_last
from soup.recipe.spec import ModelConfig, TrainConfig, load_recipe, read_recipe
from soup.train.schedule import param_groups

from conftest import CLASSES, plain_scores, run_study, tiny_recipe, tiny_swin_model, tiny_vit_model

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SWIN_UNITS = ["stage0.block0", "stage1.merge", "stage1.block0", "stage2.merge", "stage2.block0", "stage2.block1",
              "stage3.merge", "stage3.block0", "stage3.block1"]


def tiny_swin(freeze=0.0, **kwargs):
    model = build_model(ModelConfig(**tiny_swin_model(kwargs=kwargs)), CLASSES, 32)
    freeze_prefix(model.backbone, freeze)
    return model


def test_swinv2_units_are_its_mergings_and_blocks_in_forward_order():
    backbone = tiny_swin().backbone
    family = family_of(backbone)
    assert family.name == "swinv2" and family.unit_names(backbone) == SWIN_UNITS
    stages = backbone.layers
    assert family.units(backbone)[1] is stages[1].downsample and family.units(backbone)[-1] is stages[3].blocks[1]


@pytest.mark.parametrize("k", range(len(SWIN_UNITS) + 1))
def test_every_swinv2_cut_composes_to_its_forward_bit_for_bit(k):
    """Inside a stage (between blocks) and between stages (before or after a patch merging)."""
    backbone = tiny_swin().backbone.eval()
    split = PrefixSplit(backbone, family_of(backbone), k)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = split.prefix(images)
        assert torch.equal(split.suffix(tokens.clone()), backbone(images))
    assert split_matches(split, images)
    assert tokens.dim() == 4  # NHWC maps between Swin units


def test_swinv2_at_freeze_075_caches_its_frozen_stages_and_blocks():
    backbone = tiny_swin(0.75).backbone
    split, why = find_prefix(backbone, 32)
    assert split is not None, why
    assert (split.k, split.cached_text()) == (8, "8 blocks and mergings (through stage3.block0)")
    assert split.rest_text() == "stage3.block1 + head"
    names = split.prefix_names()
    assert names[0].startswith("patch_embed.") and len(names) == len(split.prefix_state())
    assert not any(n.startswith(("norm.", "head.", "layers.3.blocks.1.")) for n in names)
    # A partly frozen block runs in the suffix; a training patch embedding means no cache at all.
    backbone.layers[3].blocks[0].mlp.fc2.weight.requires_grad_(True)
    assert find_prefix(backbone, 32)[0].k == 7  # a cut between a merging and its stage's first block
    backbone.patch_embed.proj.weight.requires_grad_(True)
    assert find_prefix(backbone, 32) == (None, "the patch embedding trains")


def test_drop_path_in_the_frozen_stages_means_no_prefix_cache_for_training():
    backbone = tiny_swin(0.75, drop_path_rate=0.1).backbone  # timm's own default for SwinV2
    split, why = find_prefix(backbone, 32)
    assert split is None and "train mode" in why
    assert find_prefix(backbone, 32, eval_only=True)[0] is not None  # scoring only: still cached


def test_swinv2_layer_decay_groups_its_stages_and_blocks():
    model = tiny_swin()
    groups = param_groups(model, TrainConfig(lr=1.0, layer_decay=0.5))
    names = ["embed", "stage0.block0", "stage1.block0", "stage2.block0", "stage2.block1", "stage3.block0",
             "stage3.block1", "head"]
    assert [g["name"] for g in groups] == names
    assert [g["lr"] for g in groups] == [0.5 ** (7 - i) for i in range(8)]
    swin = model.backbone

    def group_of(param):
        return next(g["name"] for g in groups if any(p is param for p in g["params"]))
    assert group_of(swin.patch_embed.proj.weight) == "embed"
    assert group_of(swin.layers[1].downsample.reduction.weight) == "stage1.block0"  # timm's group_matcher
    assert group_of(swin.layers[2].blocks[1].attn.qkv.weight) == "stage2.block1"
    assert group_of(swin.norm.weight) == "head" and group_of(model.head.weight) == "head"
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_channels_last_is_for_networks_that_convolve_not_for_batch_norm():
    convnext = timm.create_model("test_convnext", pretrained=False, num_classes=0)  # LayerNorm, no BatchNorm
    assert not any(isinstance(m, nn.BatchNorm2d) for m in convnext.modules())
    assert wants_channels_last(convnext)
    assert wants_channels_last(timm.create_model("test_resnet", pretrained=False, num_classes=0))
    vit = build_model(ModelConfig(**tiny_vit_model()), CLASSES, 28).backbone
    wrapper = nn.Module()
    wrapper.vit = vit  # a hub entry holding a timm ViT, as tests/conftest.py's tiny DinoV2 does
    assert not wants_channels_last(vit) and not wants_channels_last(wrapper)
    assert not wants_channels_last(tiny_swin().backbone)
    assert find_family(wrapper) == (FAMILIES[0], vit)


def test_a_family_nobody_describes_is_named_in_the_reason():
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    split, why = find_prefix(resnet, 32)
    assert split is None and "ResNet is not a ViT nor a SwinV2" in why and "soup/models/families.py" in why


def test_cli_trains_a_swinv2_through_the_prefix_cache_and_its_figures_are_the_saved_weights_own(
        small_sketch_root, tmp_path):
    recipe = tiny_recipe(small_sketch_root, model=tiny_swin_model(freeze=0.75),
                         train={"epochs": 2, "amp": "fp16", "lr": 5e-3, "batch_size": 8},
                         sweep={"train.seed": [0, 1]})
    trained, cached, plain = run_study(tmp_path, recipe, ["eval", "--json"], ["eval", "--json", "--no-cache"])
    said = " ".join(trained.split())
    assert "data path: prefix cache: 8 blocks and mergings (through stage3.block0)" in said, said
    assert "training runs stage3.block1 + head" in said and "is not a ViT" not in said
    for path in sorted((tmp_path / "checkpoints" / "tiny").glob("*/model.safetensors")):
        checkpoint = read_checkpoint(path)
        plain_figures = plain_scores(checkpoint)
        last = checkpoint.meta["val_history"][-1]
        assert checkpoint.meta["val_acc"] == plain_figures["top1"], path
        assert (last["val_top1"], last["val_top5"], last["val_loss"]) == (
            plain_figures["top1"], plain_figures["top5"], plain_figures["loss"]), path
    assert json.loads(cached) == json.loads(plain)  # soup eval: through the cache or not, field for field
    # soup export: the SwinV2 in timm's names (its classifier is head.fc), loaded back with the same logits.

    result = CliRunner().invoke(cli, ["export", str(path), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architecture"] == "swinv2_tiny_window8_256" and config["pretrained_cfg"]["classifier"] == "head.fc"
    back = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(images), model_from_checkpoint(checkpoint)(images), atol=1e-5)


# ------------------------------------------------------------------ data keys a recipe leaves to its model

def write_recipe(tmp_path, model: dict, data: dict):

    path = tmp_path / f"r{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "data": {"root": str(tmp_path), **data}, "model": model}))
    return path


def test_data_keys_left_out_are_the_models_own_and_given_ones_stay(tmp_path):
    swin = write_recipe(tmp_path, {**tiny_swin_model(), "pretrained": True}, {})
    recipe, said = read_recipe(swin, [], data_defaults)
    assert (recipe.data.image_size, recipe.data.mean, recipe.data.std) == (32, IMAGENET_MEAN, IMAGENET_STD)
    assert said == (f"data: image_size 32, mean {IMAGENET_MEAN}, std {IMAGENET_STD} from timm's pretrained config "
                    "of swinv2_tiny_window8_256 (the recipe leaves them out)")
    resnet = write_recipe(tmp_path, {"backbone": "timm:test_resnet"}, {"mean": [0.1, 0.2, 0.3]})
    recipe, said = read_recipe(resnet, ["data.std=[0.3,0.3,0.3]"], data_defaults)
    # timm's test_resnet is configured for 160 px and mean/std 0.5: what the recipe sets is kept
    assert (recipe.data.image_size, recipe.data.mean, recipe.data.std) == (160, [0.1, 0.2, 0.3], [0.3, 0.3, 0.3])
    assert said == "data: image_size 160 from timm's pretrained config of test_resnet (the recipe leaves it out)"
    hub = write_recipe(tmp_path, {"backbone": "hub:facebookresearch/dinov2:dinov2_vitb14"}, {"image_size": 448})
    recipe, said = read_recipe(hub, [], data_defaults)
    assert (recipe.data.image_size, recipe.data.mean, recipe.data.std) == (448, IMAGENET_MEAN, IMAGENET_STD)
    assert said.endswith("from DinoV2's documented preprocessing (the recipe leaves them out)")
    complete = write_recipe(tmp_path, {"backbone": "timm:test_resnet"},
                            {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert read_recipe(complete, [], data_defaults)[1] == ""
    # Random weights have no preprocessing of their own; nor does a recipe read without the model's values
    # (recipe_from_dict, checkpoints' recipes): soup's defaults, as before.
    assert read_recipe(resnet, ["model.pretrained=false"], data_defaults)[0].data.image_size == 224
    assert load_recipe(resnet).data.image_size == 224


def test_soup_train_says_which_data_keys_it_took_from_the_model(small_sketch_root, tmp_path, monkeypatch):
    """Offline, as recipes/swinv2_base.yaml says: timm's pretrained weights from a local file."""
    monkeypatch.chdir(tmp_path)
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(tmp_path / "w.safetensors"))
    raw = tiny_recipe(small_sketch_root, model={"weights": str(tmp_path / "w.safetensors")})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))  # timm:test_resnet at 32 px, mean and std left out
    result = CliRunner().invoke(cli, ["train", "r.yaml"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert ("data: mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5] from timm's pretrained config of test_resnet (the "
            "recipe leaves them out)") in said
    checkpoint = read_checkpoint(next((tmp_path / "checkpoints" / "tiny").glob("*/model.safetensors")))
    assert checkpoint.recipe["data"]["mean"] == [0.5] * 3 and checkpoint.recipe["data"]["image_size"] == 32
