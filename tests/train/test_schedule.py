"""soup.train.schedule: lr schedules per step, layer-wise lr decay groups, and the EMA of the weights."""

import math

import pytest
import torch
from torch import nn

from soup.errors import SoupError
from soup.models.backbones import build_model, freeze_prefix
from soup.recipe.spec import ModelConfig, TrainConfig
from soup.train.schedule import EMA, lr_factor, make_scheduler, param_groups, vit_blocks

from conftest import CLASSES, tiny_vit_model


def factors(train, steps_per_epoch):
    return [lr_factor(train, s, steps_per_epoch) for s in range(train.epochs * steps_per_epoch)]


def test_step_schedule_is_todays_per_epoch_rule_at_every_step():
    train = TrainConfig(epochs=5, lr_drop_epoch=3, lr_drop_factor=0.1)
    assert factors(train, 4) == [1.0] * 8 + [0.1] * 12  # epochs 1-2 full, from epoch 3 on dropped
    assert factors(TrainConfig(epochs=3), 2) == [1.0] * 6


def test_cosine_schedule_per_epoch_against_hand_computation():
    train = TrainConfig(epochs=4, lr=1.0, schedule="cosine")
    # 0.5 (1 + cos(pi e / 4)) for e = 0..3
    assert factors(train, 1) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466], abs=1e-7)
    floored = TrainConfig(epochs=4, lr=1.0, schedule="cosine", min_lr=0.1)
    assert factors(floored, 1) == pytest.approx([1.0, 0.8681981, 0.55, 0.2318019], abs=1e-7)


def test_fractional_warmup_ramps_per_step_then_cosine():
    train = TrainConfig(epochs=3, lr=1.0, schedule="cosine", warmup_epochs=0.5)
    got = factors(train, 4)
    assert got[:2] == pytest.approx([0.5, 1.0])  # (step + 1) / (0.5 x 4): the first step already moves
    assert got[2] == 1.0  # epoch 0.5: warm-up over, cosine starts at its top
    # step 6 starts at epoch 1.5: one 2.5-epoch cosine, 1 / 2.5 of the way
    assert got[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    warm_step = factors(TrainConfig(epochs=2, lr_drop_epoch=2, warmup_epochs=1.0), 2)
    assert warm_step == pytest.approx([0.5, 1.0, 0.1, 0.1])


def test_scheduler_scales_every_group_and_resumes():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    train = TrainConfig(epochs=2, lr=1.0, schedule="cosine")

    def make():
        optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.25}], lr=1.0)
        return optimizer, make_scheduler(optimizer, train, steps_per_epoch=2)

    optimizer, scheduler = make()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    expected = lr_factor(train, 3, 2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, 0.25 * expected])
    state = scheduler.state_dict()
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    optimizer2.step()
    scheduler2.step()
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]


def group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_layer_decay_groups_on_a_tiny_timm_vit():
    model = build_model(ModelConfig(**tiny_vit_model()), CLASSES, 28)  # depth 4
    groups = param_groups(model, TrainConfig(lr=1.0, layer_decay=0.5))
    assert [g["name"] for g in groups] == ["embed", "block0", "block1", "block2", "block3", "head"]
    assert [g["lr"] for g in groups] == [0.5 ** 5, 0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5, 1.0]
    vit = model.backbone
    assert group_of(groups, vit.cls_token)["name"] == "embed"
    assert group_of(groups, vit.pos_embed)["name"] == "embed"
    assert group_of(groups, vit.patch_embed.proj.weight)["name"] == "embed"
    assert group_of(groups, vit.blocks[2].attn.qkv.weight)["name"] == "block2"
    assert group_of(groups, vit.norm.weight)["name"] == "head"
    assert group_of(groups, model.head.weight)["name"] == "head"
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1.0)  # the groups are what an optimizer takes


def test_layer_decay_leaves_frozen_parameters_out_and_none_is_one_group():
    model = build_model(ModelConfig(**tiny_vit_model()), CLASSES, 28)
    freeze_prefix(model.backbone, 0.5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, TrainConfig(lr=1.0, layer_decay=0.8))
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert "embed" not in [g["name"] for g in groups]
    plain = param_groups(model, TrainConfig(lr=0.1))
    assert len(plain) == 1 and plain[0]["lr"] == 0.1 and plain[0]["params"] == trainable


def test_layer_decay_groups_on_the_local_hub_dinov2(hub_dir):
    cfg = ModelConfig(backbone=f"hub:{hub_dir}:tiny_dinov2", pretrained=False, kwargs={"img_size": 28, "depth": 2})
    model = build_model(cfg, CLASSES, 28)
    groups = param_groups(model, TrainConfig(lr=2.0, layer_decay=0.5))
    assert [(g["name"], g["lr"]) for g in groups] == [("embed", 0.25), ("block0", 0.5), ("block1", 1.0),
                                                      ("head", 2.0)]
    vit = model.backbone.vit
    assert group_of(groups, vit.blocks[1].mlp.fc1.weight)["name"] == "block1"
    assert group_of(groups, vit.pos_embed)["name"] == "embed"


class ChunkedViT(nn.Module):
    """DinoV2's chunked layout: `blocks` holds ModuleLists padded with Identity in front."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.patch_embed = nn.Linear(4, 4)
        chunk = [nn.Linear(4, 4) for _ in range(4)]
        self.blocks = nn.ModuleList([nn.ModuleList(chunk[:2]), nn.ModuleList([nn.Identity(), nn.Identity(),
                                                                              *chunk[2:]])])
        self.chunk = chunk
        self.norm = nn.LayerNorm(4)


def test_chunked_blocks_are_flattened_in_order():
    backbone = ChunkedViT()
    assert vit_blocks(backbone) == backbone.chunk
    model = nn.Module()
    model.backbone, model.head = backbone, nn.Linear(4, 2)
    groups = param_groups(model, TrainConfig(lr=1.0, layer_decay=0.5))
    assert [g["name"] for g in groups] == ["embed", "block0", "block1", "block2", "block3", "head"]
    assert group_of(groups, backbone.chunk[3].weight)["lr"] == 0.5
    assert group_of(groups, backbone.norm.weight)["lr"] == 1.0


def test_layer_decay_on_a_non_vit_is_a_clear_error():
    model = build_model(ModelConfig(backbone="timm:test_resnet", pretrained=False), CLASSES, 32)
    with pytest.raises(SoupError, match=r"train.layer_decay: the backbone \(ResNet\) has 0 stacks of blocks.*"
                                        "set train.layer_decay: null"):
        param_groups(model, TrainConfig(layer_decay=0.75))


def test_ema_matches_a_hand_computed_average_on_one_parameter():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = 1.0
    for x in (1.0, -2.0, 3.0):
        optimizer.zero_grad()
        model(torch.tensor([[x]])).sum().backward()  # gradient x: w -= 0.5 x
        optimizer.step()
        ema.update()
        expected = 0.9 * expected + 0.1 * model.weight.item()
    assert model.weight.item() == pytest.approx(0.0)  # 1 - 0.5 (1 - 2 + 3)
    assert ema.state_dict()["weight"].item() == pytest.approx(expected, abs=1e-7)
    assert ema.state_dict()["weight"].item() != pytest.approx(model.weight.item())
    with ema.swapped():
        assert model.weight.item() == pytest.approx(expected, abs=1e-7)
    assert model.weight.item() == pytest.approx(0.0)


def test_ema_tracks_trained_parameters_and_float_buffers_and_resumes():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert ema.names == ["1.weight", "1.bias", "2.weight", "2.bias", "1.running_mean", "1.running_var"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 3)).pow(2).sum().backward()
        optimizer.step()
        ema.update()
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    assert not torch.equal(state["2.weight"], model[2].weight)
    assert not torch.equal(state["1.running_mean"], model[1].running_mean)
    again = EMA(model, decay=0.5)
    again.load_state_dict(state)
    assert all(torch.equal(again.state_dict()[k], state[k]) for k in state)
    with pytest.raises(SoupError, match="the saved EMA does not fit this model"):
        again.load_state_dict({"2.weight": state["2.weight"]})
