import urllib.error

import pytest
import torch
from click.testing import CliRunner

from soup.cli import cli
from soup.errors import SoupError
from soup.models.backbones import build_model, fingerprint, freeze_prefix, model_from_checkpoint
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.recipe.spec import ModelConfig

from conftest import tiny_vit_model


def test_timm_dinov2_architecture_builds_and_classifies():
    model = build_model(ModelConfig(**tiny_vit_model()), ["a", "b", "c"], 28)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 3)
    assert set(k.split(".")[0] for k in model.state_dict()) == {"backbone", "head"}


def test_hub_local_directory_returns_cls_features(hub_dir):
    cfg = ModelConfig(backbone=f"hub:{hub_dir}:tiny_dinov2", pretrained=False, kwargs={"img_size": 28})
    model = build_model(cfg, ["a", "b"], 28)
    assert model.head.in_features == 32
    assert model(torch.zeros(1, 3, 28, 28)).shape == (1, 2)


def test_hub_network_failure_is_one_clear_line(hub_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    cfg = ModelConfig(backbone=f"hub:{hub_dir}:tiny_dinov2", pretrained=True, kwargs={"img_size": 28})
    with pytest.raises(SoupError, match="no network.*model.weights.*torch.hub cache"):
        build_model(cfg, ["a", "b"], 28)


def test_github_hub_goes_through_torch_hub(monkeypatch):
    calls = {}

    def fake_load(repo, entry, **kwargs):
        calls.update(repo=repo, entry=entry, **kwargs)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load", fake_load)
    cfg = ModelConfig(backbone="hub:facebookresearch/dinov2:dinov2_vitb14")
    with pytest.raises(SoupError, match="could not fetch hub:facebookresearch/dinov2:dinov2_vitb14"):
        build_model(cfg, ["a"], 224)
    assert calls["repo"] == "facebookresearch/dinov2" and calls["entry"] == "dinov2_vitb14"
    assert calls["pretrained"] is True and calls["source"] == "github"


def test_local_weights_file_replaces_download(hub_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("weights: must not download"))
    cfg = ModelConfig(backbone=f"hub:{hub_dir}:tiny_dinov2", pretrained=True, kwargs={"img_size": 28},
                      init_seed=5)
    source = build_model(ModelConfig(**{**cfg.__dict__, "pretrained": False}), ["a"], 28).backbone
    torch.save(source.state_dict(), tmp_path / "dino.pth")
    cfg.weights = str(tmp_path / "dino.pth")
    loaded = build_model(cfg, ["a"], 28).backbone
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


class Evil:
    pass


def test_pickled_weights_are_refused(tmp_path, hub_dir):
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    cfg = ModelConfig(backbone=f"hub:{hub_dir}:tiny_dinov2", weights=str(tmp_path / "evil.pth"),
                      kwargs={"img_size": 28})
    with pytest.raises(SoupError, match="evil.pth as weights.*weights_only=True"):
        build_model(cfg, ["a"], 28)


def test_timm_local_weights_file(tmp_path):
    cfg = ModelConfig(**tiny_vit_model(init_seed=3))
    reference = build_model(cfg, ["a"], 28).backbone
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "vit.safetensors")
    cfg2 = ModelConfig(**tiny_vit_model(init_seed=4, pretrained=True, weights=str(tmp_path / "vit.safetensors")))
    loaded = build_model(cfg2, ["a"], 28).backbone
    assert torch.equal(loaded.state_dict()["blocks.0.attn.qkv.weight"], reference.state_dict()["blocks.0.attn.qkv.weight"])


def test_soup_checkpoint_as_start_loads_head_only_for_same_classes(tmp_path):
    cfg = ModelConfig(**tiny_vit_model(init_seed=1))
    trained = build_model(cfg, ["a", "b"], 28)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    meta = {"kind": "ingredient", "recipe": {}, "backbone": cfg.backbone, "classes": ["a", "b"],
            "start_fingerprint": "x"}
    save_checkpoint(tmp_path / "m.safetensors", trained.state_dict(), meta)
    same = build_model(ModelConfig(**tiny_vit_model(init_seed=1, weights=str(tmp_path / "m.safetensors"))),
                       ["a", "b"], 28)
    other = build_model(ModelConfig(**tiny_vit_model(init_seed=1, weights=str(tmp_path / "m.safetensors"))),
                        ["x", "y", "z"], 28)
    assert torch.equal(same.head.weight, trained.head.weight)
    assert torch.equal(other.backbone.pos_embed, trained.backbone.pos_embed)
    assert other.head.weight.shape == (3, 32)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.75, 1.0])
def test_freeze_fraction_is_a_prefix(fraction):
    model = build_model(ModelConfig(**tiny_vit_model()), ["a", "b"], 28)
    frozen, total = freeze_prefix(model.backbone, fraction)
    flags = [p.requires_grad for p in model.backbone.parameters()]
    assert flags == sorted(flags)  # frozen ones first, then trainable
    assert frozen == sum(p.numel() for p in model.backbone.parameters() if not p.requires_grad)
    assert frozen <= fraction * total + 0.5
    largest = max(p.numel() for p in model.backbone.parameters())
    assert frozen >= fraction * total - largest
    assert model.head.weight.requires_grad


def test_fingerprint_tracks_the_start():
    cfg = ModelConfig(**tiny_vit_model(init_seed=0))
    a, b = build_model(cfg, ["a"], 28), build_model(cfg, ["a"], 28)
    c = build_model(ModelConfig(**tiny_vit_model(init_seed=1)), ["a"], 28)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_full_size_vit_b14_architecture_through_the_cli(small_sketch_root, tmp_path):
    """The reference recipe with the real ViT-B/14 architecture (random weights), one step on a few images."""
    result = CliRunner().invoke(cli, [
        "train", "recipes/dinov2_f75.yaml", "--ingredient", "0", "--out", str(tmp_path),
        "--set", "model.backbone=timm:vit_base_patch14_dinov2", "--set", "model.pretrained=false",
        "--set", "model.kwargs.img_size=224", "--set", "train.epochs=1", "--set", "train.num_workers=0",
        "--set", f"data.root={small_sketch_root}", "--set", "train.batch_size=24", "--set", "train.amp=off",
    ])
    assert result.exit_code == 0, result.output
    checkpoint = read_checkpoint(tmp_path / "dinov2_f75" / "00-seed0-lr0.005" / "model.safetensors")
    assert checkpoint.meta["recipe"]["model"]["freeze"] == 0.75
    model = model_from_checkpoint(checkpoint)
    assert sum(p.numel() for p in model.backbone.parameters()) > 85_000_000
    assert "parameters train" in result.output
