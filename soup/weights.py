"""Weight-space arithmetic shared by the soup methods and `soup inspect`: a streaming weighted average of
checkpoints (read one tensor at a time, so memory stays near one model however many are mixed) and the
starting weights an ingredient was fine-tuned from, rebuilt from its recipe and checked by fingerprint.
"""

from __future__ import annotations

import contextlib

import torch
from safetensors import safe_open

from soup.backbones import build_model, fingerprint
from soup.checkpoint import Checkpoint
from soup.errors import SoupError
from soup.probe import probed_start
from soup.recipe import recipe_from_dict


def starting_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights `checkpoint`'s ingredients started from, rebuilt from its recipe exactly as training
    built them (pretrained backbone or model.weights, head from init_seed or the probed head), checked by fingerprint."""
    recipe = recipe_from_dict(checkpoint.recipe)
    model = build_model(recipe.model, checkpoint.classes, recipe.data.image_size, recorded_in=checkpoint.path)
    model = probed_start(model, recipe, checkpoint.path)
    rebuilt = fingerprint(model)
    if rebuilt != checkpoint.fingerprint:
        source = recipe.model.weights or recipe.model.backbone
        raise SoupError(f"{checkpoint.path}: the recipe's start ({source}) now rebuilds with fingerprint "
                        f"{rebuilt}, not the {checkpoint.fingerprint} its ingredients started from; restore "
                        "the original weights file (model.weights) or torch.hub/timm cache")
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone()
            for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _tensors(source: Checkpoint | dict):
    """(keys, get) for a checkpoint file (read lazily, one tensor at a time) or an in-memory state dict."""
    if isinstance(source, dict):
        yield list(source), source.__getitem__
    else:
        with safe_open(str(source.path), framework="pt") as f:
            yield list(f.keys()), f.get_tensor


def weighted_average(members: list[tuple[Checkpoint | dict, float]]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·θᵢ over floating tensors, accumulated in fp32 and read one tensor at a time; integer buffers
    (BatchNorm's num_batches_tracked) are copied from the first member, never averaged into floats.
    No member is modified."""
    total: dict[str, torch.Tensor] = {}
    for index, (source, weight) in enumerate(members):
        with _tensors(source) as (keys, get):
            for key in keys:
                tensor = get(key)
                # Copies: a member may be an in-memory state (the start) that later mixes still read.
                if not tensor.is_floating_point():
                    if index == 0:
                        total[key] = tensor.clone()
                elif index == 0:
                    total[key] = tensor.to(torch.float32, copy=True).mul_(weight)
                else:
                    total[key].add_(tensor.float(), alpha=weight)
    return total
