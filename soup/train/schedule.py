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
  ones are left out). One group at `train.lr`; with `train.layer_decay` d, one group per layer of a ViT
  with "lr" = train.lr x "lr_scale": block i (0-based) of `depth` at d^(depth - i), the patch/position
  embeddings and everything else before the blocks at d^(depth + 1), the final norm and the head at 1.
  The blocks are the backbone's one module named `blocks` (timm VisionTransformer, torch.hub DinoV2,
  whose chunked layout is flattened; a wrapper around either is fine); any other backbone is a SoupError.
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
from soup.recipe.spec import TrainConfig


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

def vit_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks in order: the one ModuleList/Sequential named `blocks` below the backbone,
    DinoV2's chunks (ModuleLists padded with Identity) flattened."""
    found = [m for name, m in backbone.named_modules()
             if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, (nn.ModuleList, nn.Sequential))]
    if len(found) != 1:
        raise SoupError(f"train.layer_decay: the backbone ({type(backbone).__name__}) has {len(found)} stacks of "
                        "blocks, not one; layer-wise lr decay covers ViTs (timm VisionTransformer, DinoV2); set "
                        "train.layer_decay: null for this backbone")
    flat = []
    for block in found[0]:
        if isinstance(block, nn.ModuleList):
            flat += [b for b in block if not isinstance(b, nn.Identity)]
        else:
            flat.append(block)
    return flat


def layer_ids(model: nn.Module) -> tuple[dict[int, int], int]:
    """({id(parameter): layer}, depth) for a `Classifier`: 0 before the blocks, i + 1 in block i, depth + 1
    after them (final norm, pooling, and the classifier's head outside the backbone)."""
    blocks = vit_blocks(model.backbone)
    depth = len(blocks)
    in_block = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
    layers, after = {}, False
    # Parameters come in registration order: a ViT registers its embeddings, then its blocks, then its norm.
    for p in model.backbone.parameters():
        after = after or id(p) in in_block
        layers[id(p)] = in_block.get(id(p), depth + 1 if after else 0)
    for p in model.parameters():
        layers.setdefault(id(p), depth + 1)
    return layers, depth


def param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """Optimizer parameter groups over the trainable parameters (see the module comment)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if train.layer_decay is None:
        return [{"params": trainable, "lr": train.lr, "lr_scale": 1.0, "name": "all"}]
    layers, depth = layer_ids(model)
    groups: dict[int, dict] = {}
    for p in trainable:
        layer = layers[id(p)]
        if layer not in groups:
            scale = train.layer_decay ** (depth + 1 - layer)
            name = "embed" if layer == 0 else "head" if layer == depth + 1 else f"block{layer - 1}"
            groups[layer] = {"params": [], "lr": train.lr * scale, "lr_scale": scale, "name": name}
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
