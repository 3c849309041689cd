import json

import pytest
import torch

from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import expand_sweep
from soup.train.loop import lr_factor, train_ingredient
from soup.train.sweep import train_recipe

from conftest import CLASSES, state_close, tiny_vit_model


def test_two_epochs_beat_chance_and_metadata_round_trips(sketch_root, tmp_path, make_recipe):
    recipe = make_recipe(sketch_root, train={"epochs": 2, "seed": 3, "lr": 1e-3, "batch_size": 8})
    [(ingredient, path)] = train_recipe(recipe, tmp_path)
    checkpoint = read_checkpoint(path)
    assert path == tmp_path / "tiny" / "00" / "model.safetensors"
    meta = checkpoint.meta
    assert meta["val_acc"] > 1 / len(CLASSES) + 0.15
    assert meta["kind"] == "ingredient" and meta["classes"] == CLASSES and meta["seed"] == 3
    assert meta["backbone"] == "timm:test_resnet" and len(meta["start_fingerprint"]) == 16
    assert [h["epoch"] for h in meta["val_history"]] == [1, 2]
    assert meta["recipe"] == recipe.to_dict()
    assert all(t.dtype != torch.float16 and t.dtype != torch.bfloat16 for t in checkpoint.state_dict().values())
    # Integer buffers keep their type in the checkpoint.
    assert checkpoint.state_dict()["backbone.bn1.num_batches_tracked"].dtype == torch.int64
    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert metrics["val_acc"] == meta["val_acc"] and metrics["trainable_params"] > 0


def test_same_seed_same_weights_other_seed_other_weights(small_sketch_root, tmp_path, make_recipe):
    recipe = make_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.5), data={"image_size": 28},
                         sweep={"train.seed": [0, 0, 1]})
    paths = [train_ingredient(i, tmp_path) for i in expand_sweep(recipe)]
    a, b, c = (read_checkpoint(p) for p in paths)
    assert state_close(a.state_dict(), b.state_dict())
    assert not state_close(a.state_dict(), c.state_dict())
    assert a.fingerprint == b.fingerprint == c.fingerprint  # a sweep shares its start


def test_frozen_parameters_do_not_move(small_sketch_root, tmp_path, make_recipe):
    from soup.models.backbones import build_model

    recipe = make_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.75), data={"image_size": 28})
    [(ingredient, path)] = train_recipe(recipe, tmp_path)
    start = build_model(recipe.model, CLASSES, 28).state_dict()
    end = read_checkpoint(path).state_dict()
    assert torch.equal(start["backbone.patch_embed.proj.weight"], end["backbone.patch_embed.proj.weight"])
    assert torch.equal(start["backbone.blocks.0.attn.qkv.weight"], end["backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(start["backbone.blocks.3.mlp.fc2.weight"], end["backbone.blocks.3.mlp.fc2.weight"])
    assert not torch.equal(start["head.weight"], end["head.weight"])


def test_hub_local_backbone_trains(small_sketch_root, hub_dir, tmp_path, make_recipe):
    recipe = make_recipe(small_sketch_root, data={"image_size": 28},
                         model={"backbone": f"hub:{hub_dir}:tiny_dinov2", "pretrained": False,
                                "kwargs": {"img_size": 28}, "freeze": 0.5})
    [(_, path)] = train_recipe(recipe, tmp_path)
    assert read_checkpoint(path).backbone.startswith("hub:")


def test_lr_schedule_drops_at_the_named_epoch(tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, train={"lr_drop_epoch": 7, "lr_drop_factor": 0.1})
    assert [lr_factor(recipe, e) for e in range(10)] == [1.0] * 6 + [0.1] * 4


def test_bad_data_folder_is_a_clear_error(tmp_path, make_recipe):
    with pytest.raises(SoupError, match="train_images: no such folder; expected"):
        train_recipe(make_recipe(tmp_path / "nothing"), tmp_path)
    (tmp_path / "d" / "train_images" / "cat").mkdir(parents=True)
    with pytest.raises(SoupError, match="cat: class folder holds no images"):
        train_recipe(make_recipe(tmp_path / "d"), tmp_path)


def test_val_classes_must_match_train(sketch_root, tmp_path, make_recipe):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sketch_root, root)
    shutil.rmtree(root / "val_images" / "cross")
    with pytest.raises(SoupError, match="val_images: class folders differ from train_images"):
        train_recipe(make_recipe(root), tmp_path / "out")


def test_nan_loss_stops_with_a_message(small_sketch_root, tmp_path, make_recipe):
    # The highest lr a recipe may hold (soup.recipe.checks.MAX_RATE): SGD at it diverges within an epoch.
    recipe = make_recipe(small_sketch_root, train={"lr": 1e4, "optimizer": "sgd", "epochs": 3})
    with pytest.raises(SoupError, match=r"loss became .* at epoch \d+, step \d+ \(lr 10000, amp off\)"):
        train_recipe(recipe, tmp_path)
    assert not (tmp_path / "tiny" / "00" / "model.safetensors").exists()
