"""Two speed-ups of training with random augmentation (issue 12): every epoch's val pass runs the trained
part only, on frozen-prefix tokens computed once (val images are never augmented), and CPU bf16 training
steps run timm's attention unfused. Both must compute what the slow way computes."""

import io

import pytest
import torch
from rich.console import Console
from timm.layers.attention import Attention

from soup.fast.build import build_pipeline
from soup.fast.determinism import moves_state_in_train_mode
from soup.models import precision
from soup.models.backbones import build_model
from soup.models.inference import evaluate, make_loader
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import tiny_recipe, tiny_vit_model, vit_setup

CPU = torch.device("cpu")


def plain_val(model, val_set):
    return evaluate(model, make_loader(val_set, 16, 0, CPU), CPU)


def agree(cached: dict, plain: dict) -> None:
    assert cached["n"] == plain["n"] and cached["top1"] == plain["top1"] and cached["top5"] == plain["top5"]
    assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-2)


@pytest.mark.parametrize("augment, kwargs, train_why", [
    ("randaugment", {}, "data.augment randaugment changes the images"),
    ("none", {"drop_path_rate": 0.2}, "in train mode"),  # drop-path: eval mode is still one function
])
def test_val_runs_the_trained_part_on_cached_prefix_tokens(small_sketch_root, fresh_caches, augment, kwargs,
                                                           train_why):
    recipe, model, train_set, val_set = vit_setup(small_sketch_root, augment, **kwargs)
    pipeline = build_pipeline(recipe, model, train_set, val_set, CPU)
    assert pipeline.description.startswith("decoded-image cache"), pipeline.description
    assert "no prefix cache for training: " in pipeline.description and train_why in pipeline.description
    assert "val: prefix cache (2 blocks" in pipeline.description and "then blocks 2-3 + head" in pipeline.description
    agree(pipeline.evaluate(), plain_val(model, val_set))
    # Training moves the trained part only: the stored tokens stay valid, val keeps agreeing.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for images, targets in pipeline.train_batches(0):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(pipeline.model(images), targets).backward()
        optimizer.step()
    agree(pipeline.evaluate(), plain_val(model, val_set))


def test_a_prefix_whose_train_mode_moves_buffers_is_not_cached_for_val():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert moves_state_in_train_mode(net, [net], torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # and the probe restored them
    dropout = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    assert not moves_state_in_train_mode(dropout, [dropout], torch.randn(2, 4))


# ------------------------------------------------------------------------------ unfused CPU attention

def tiny_vit():
    recipe = recipe_from_dict(tiny_recipe("/nonexistent", model=tiny_vit_model(), data={"image_size": 28}))
    return build_model(recipe.model, ["a", "b", "c"], 28)


def test_only_cpu_bf16_steps_unfuse_attention():
    model = tiny_vit()
    modules = precision.unfused_attention_modules(model, CPU, torch.bfloat16)
    assert len(modules) == 4 and all(m.fused_attn is True for m in modules)  # one per block
    assert precision.unfused_attention_modules(model, CPU, None) == []
    assert precision.unfused_attention_modules(model, torch.device("cuda"), torch.bfloat16) == []
    with pytest.raises(RuntimeError), precision.explicit_attention(modules):
        assert all(m.fused_attn is False for m in modules)
        raise RuntimeError("a failing step")
    assert all(m.fused_attn is True for m in modules)


def test_unfused_attention_computes_the_same_function():
    model = tiny_vit().train()
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    modules = precision.unfused_attention_modules(model, CPU, torch.bfloat16)
    results = []
    for unfused in (False, True):
        model.zero_grad()
        with (torch.autocast("cpu", dtype=torch.bfloat16),
              precision.explicit_attention(modules if unfused else [])):
            logits = model(x)
        logits.float().pow(2).sum().backward()
        results.append((logits.float(), model.backbone.blocks[-1].attn.qkv.weight.grad.clone()))
    (fused_out, fused_grad), (plain_out, plain_grad) = results
    assert torch.allclose(fused_out, plain_out, rtol=0.05, atol=0.05)
    assert torch.allclose(fused_grad, plain_grad, rtol=0.1, atol=0.05 * fused_grad.abs().max().item())


def test_cpu_bf16_training_steps_run_attention_unfused(small_sketch_root, tmp_path, monkeypatch, fresh_caches):
    # Whatever this machine's CPU: bf16 autocast as on one with avx512_bf16.
    monkeypatch.setattr(precision, "cpu_bf16", lambda: (True, "native bf16 (test)"))
    seen = {"train": set(), "eval": set()}

    forward = Attention.forward

    def recording_forward(self, *args, **kwargs):
        seen["train" if self.training else "eval"].add(self.fused_attn)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "forward", recording_forward)
    raw = tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.0), data={"image_size": 28},
                      train={"amp": "bf16", "batch_size": 8})
    console = Console(file=io.StringIO(), width=300)
    train_ingredient(expand_sweep(recipe_from_dict(raw))[0], tmp_path, console)
    printed = console.file.getvalue()
    assert "bfloat16 autocast" in printed and "attention unfused in training steps" in printed
    assert seen == {"train": {False}, "eval": {True}}

