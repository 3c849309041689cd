"""Optimisation blocks of a training run: the lr schedule, layer-wise lr decay and an EMA of the weights.

Interface (the training loop's side; each piece is independent of the loop's shape):
- `make_scheduler(optimizer, train, steps_per_epoch)`: a LambdaLR stepped after every optimizer step
  (not every epoch); its state_dict resumes it. `lr_factor(train, step, steps_per_epoch)` is its
  multiplier of optimizer step `step` (0-based over the whole run):
  * `schedule: step` — `lr_drop_factor` from epoch `lr_drop_epoch` on (epochs count from 1): the same
    lr at every step of an epoch as the per-epoch rule before it.
  * `schedule: cosine` — from lr down to `min_lr` along half a cosine over the epochs after warm-up.
  * `warmup_epochs` W > 0 (either schedule, fractions allowed): the factor is also multiplied by
    (step + 1) / (W x steps_per_epoch) until that reaches 1, so the first step already moves.
  With layer decay every group keeps its own scale: the factor multiplies each group's lr (min_lr too).
- `param_groups(model, train)`: the optimizer's parameter groups over the parameters that train (frozen
  ones are left out). One group at `train.lr`; with `train.layer_decay` d, one group per layer with
  "lr" = train.lr x "lr_scale": layer i (0-based) of `depth` at d^(depth - i), the patch/position
  embeddings and everything else before the layers at d^(depth + 1), the final norm and the head at 1.
  The layers are what the backbone's family (soup.models.families) says: a ViT's blocks (timm, torch.hub
  DinoV2 with its chunks flattened, any one stack named `blocks`; a wrapper around one is fine), a
  SwinV2's blocks with each stage's patch merging joined to its first block (timm's group_matcher);
  any other backbone is a SoupError.
- `EMA(model, decay)`: `update()` after each optimizer step; `swapped()` puts the averaged weights into
  the model for evaluation or saving and restores the trained ones after; `state_dict()` /
  `load_state_dict()` for resume.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from soup.errors import SoupError
from soup.models.families import Blocks, Family, find_family
from soup.recipe.spec import TrainConfig


def make_optimizer(t: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g["params"]]
    # One fused kernel per step instead of a loop over tensors; only where every tensor is on a GPU.
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused)


def lr_factor(train: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The lr multiplier of optimizer step `step` (0-based over the run); see the module comment."""
    epoch = step / steps_per_epoch  # where this step starts, in epochs
    if train.schedule == "cosine":
        progress = min(1.0, max(0.0, (epoch - train.warmup_epochs) / (train.epochs - train.warmup_epochs)))
        floor = train.min_lr / train.lr
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        drop = train.lr_drop_epoch
        factor = train.lr_drop_factor if drop is not None and step // steps_per_epoch + 1 >= drop else 1.0
    if train.warmup_epochs > 0:
        factor *= min(1.0, (step + 1) / (train.warmup_epochs * steps_per_epoch))
    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Step it after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(train, step, steps_per_epoch))


# ------------------------------------------------------------------------------ layer-wise lr decay

def _family(backbone: nn.Module) -> tuple[Family, nn.Module]:
    found = find_family(backbone)
    if found is None:
        raise SoupError(f"train.layer_decay: the backbone ({type(backbone).__name__}) has "
                        f"{len(Blocks.stacks(backbone))} stacks of blocks, not one, and no family soup knows "
                        "(timm ViT, DinoV2, SwinV2: soup/models/families.py); set train.layer_decay: null for this "
                        "backbone")
    return found


def layers_of(backbone: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(name, parameters) of each layer between the stem and the head, as the backbone's family
    (soup.models.families) groups them; a SoupError for a backbone no family describes."""
    family, module = _family(backbone)
    return family.layers(module)


def vit_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The blocks in order of a backbone a family describes (DinoV2's chunks flattened)."""
    family, module = _family(backbone)
    return family.units(module)


def layer_ids(model: nn.Module) -> tuple[dict[int, int], list[str]]:
    """({id(parameter): layer}, names of the layers) for a `Classifier`: 0 before the family's layers,
    i + 1 in layer i, depth + 1 after them (final norm, pooling, and the classifier's head outside the
    backbone)."""
    groups = layers_of(model.backbone)
    depth = len(groups)
    in_layer = {id(p): i + 1 for i, (_, params) in enumerate(groups) for p in params}
    layers, after = {}, False
    # Parameters come in registration order: a ViT registers its embeddings, then its blocks, then its norm.
    for p in model.backbone.parameters():
        after = after or id(p) in in_layer
        layers[id(p)] = in_layer.get(id(p), depth + 1 if after else 0)
    for p in model.parameters():
        layers.setdefault(id(p), depth + 1)
    return layers, ["embed", *(name for name, _ in groups), "head"]


def param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters (see the module comment)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if train.layer_decay is None:
        return [{"params": trainable, "lr": train.lr, "lr_scale": 1.0, "name": "all"}]
    layers, names = layer_ids(model)
    depth = len(names) - 2
    groups: dict[int, dict] = {}
    for p in trainable:
        layer = layers[id(p)]
        if layer not in groups:
            scale = train.layer_decay ** (depth + 1 - layer)
            groups[layer] = {"params": [], "lr": train.lr * scale, "lr_scale": scale, "name": names[layer]}
        groups[layer]["params"].append(p)
    return [groups[layer] for layer in sorted(groups)]


# --------------------------------------------------------------------------------------------- EMA

class EMA:
    """ema = decay x ema + (1 - decay) x weight after every step, over the parameters that train and the
    floating-point buffers (BatchNorm statistics move in frozen layers too); integer buffers and frozen
    parameters never change and are not copied. The update is torch's `get_ema_multi_avg_fn` (one
    foreach lerp); the average starts from the weights at construction."""

    def __init__(self, model: nn.Module, decay: float):
        tracked = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        tracked += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.names = [n for n, _ in tracked]
        self._live = [t for _, t in tracked]
        self._shadow = [t.detach().clone() for t in self._live]
        self._update = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self) -> None:
        if self._live:
            self._update(self._shadow, [t.detach() for t in self._live], None)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its trained ones again after it."""
        with torch.no_grad():
            trained = [t.detach().clone() for t in self._live]
            for live, shadow in zip(self._live, self._shadow):
                live.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for live, saved in zip(self._live, trained):
                    live.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self._shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            raise SoupError("the saved EMA does not fit this model (freeze or architecture changed); delete the "
                            "saved state to start over")
        for name, shadow in zip(self.names, self._shadow):
            shadow.copy_(state[name])
