"""The probed start (LP-FT, `model.probe`): the head trained alone on the frozen backbone before any
ingredient trains, shared by every ingredient that starts from the same weights on the same data.

The probe is an ordinary training run of a derived recipe (`probe_recipe`: freeze 1.0, no augmentation,
the probe's epochs/lr/optimizer/batch size, seeded by model.init_seed), so it takes the fastest data path
(at freeze 1.0 the prefix cache holds the whole backbone) and the same lock, resume and atomic writes as
an ingredient. Its checkpoint, kind "probe", lives at `<out>/<recipe name>/probe-<key>/model.safetensors`;
the key hashes the derived recipe, so ingredients of a sweep that differ only in training settings share
one probe, and those that differ in their start (backbone, data, init_seed, ...) get their own.
`soup cook` finds it the same way from an ingredient's recorded recipe (`probed_start`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from soup.backbones import fingerprint
from soup.checkpoint import INGREDIENT_FILE, read_checkpoint
from soup.errors import SoupError
from soup.recipe import Ingredient, Recipe, TrainConfig

KIND = "probe"


def probe_recipe(recipe: Recipe) -> Recipe | None:
    """The recipe that trains `recipe`'s probe, or None without `model.probe`."""
    probe, t = recipe.model.probe, recipe.train
    if probe is None:
        return None
    train = TrainConfig(epochs=probe.epochs, lr=probe.lr, optimizer=probe.optimizer,
                        batch_size=probe.batch_size or t.batch_size, momentum=t.momentum, amp=t.amp,
                        seed=recipe.model.init_seed, num_workers=t.num_workers, device=t.device)
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, augment="none"),
                               model=dataclasses.replace(recipe.model, freeze=1.0, probe=None),
                               train=train, sweep={}, search=None)


def probe_ingredient(recipe: Recipe) -> Ingredient | None:
    derived = probe_recipe(recipe)
    if derived is None:
        return None
    key = hashlib.sha256(json.dumps(derived.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return Ingredient(0, f"{KIND}-{key}", derived, {}, sweep_ids=[])


def probe_file(recipe: Recipe, out: str | Path) -> Path | None:
    """Where `recipe`'s probe checkpoint lives under `out` (None without `model.probe`)."""
    item = probe_ingredient(recipe)
    return None if item is None else Path(out) / recipe.name / item.id / INGREDIENT_FILE


def load_probe(model: nn.Module, path: Path) -> nn.Module:
    """Put the probe's weights into `model` (built from the recipe's start): checked to have been trained
    from that very start."""
    checkpoint = read_checkpoint(path)
    start = fingerprint(model)
    if checkpoint.kind != KIND or checkpoint.fingerprint != start:
        raise SoupError(f"{path}: this probed start was not trained from this recipe's start (fingerprint "
                        f"{checkpoint.fingerprint}, not {start}); delete its folder to probe again")
    with torch.no_grad():
        model.load_state_dict(checkpoint.state_dict())
    return model


def probed_start(model: nn.Module, recipe: Recipe, ingredient_path: str | Path) -> nn.Module:
    """The start of an ingredient saved at `ingredient_path` (`<out>/<name>/<id>/model.safetensors`):
    `model`, built from its recipe, plus its probed head when the recipe has `model.probe`."""
    path = probe_file(recipe, Path(ingredient_path).parent.parent.parent)
    if path is None:
        return model
    if not path.is_file():
        raise SoupError(f"{ingredient_path} started from the probed start {path}, which is missing; keep the "
                        f"{path.parent.name} folder beside the ingredients (or retrain it with soup train)")
    return load_probe(model, path)
