"""The probed start (LP-FT, `model.probe`): the head trained alone on the frozen backbone before any
ingredient trains, shared by every ingredient that starts from the same weights on the same data.

The probe is an ordinary training run of a derived recipe (`probe_recipe`: freeze 1.0, no augmentation,
the probe's epochs/lr/optimizer/batch size, seeded by model.init_seed), so it takes the fastest data path
(at freeze 1.0 the prefix cache holds the whole backbone) and the same lock, resume and atomic writes as
an ingredient. Its checkpoint, kind "probe", lives at `<out>/<recipe name>/probe-<key>/model.safetensors`;
the key hashes the derived recipe, so ingredients of a sweep that differ only in training settings share
one probe, and those that differ in their start (backbone, data, init_seed, ...) get their own.
`soup cook` finds it from a checkpoint's recorded recipe and place: beside an ingredient, or for a soup
beside the members it records, wherever the soup itself lives (`probed_start`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from soup.errors import SoupError
from soup.models.backbones import fingerprint
from soup.models.checkpoint import Checkpoint, read_checkpoint
from soup.models.runs import INGREDIENT_FILE, ingredient_file
from soup.recipe.spec import Ingredient, Recipe, TrainConfig, resumable

KIND = "probe"


def probe_recipe(recipe: Recipe) -> Recipe | None:
    """The recipe that trains `recipe`'s probe, or None without `model.probe`."""
    probe, t = recipe.model.probe, recipe.train
    if probe is None:
        return None
    train = TrainConfig(epochs=probe.epochs, lr=probe.lr, optimizer=probe.optimizer,
                        batch_size=probe.batch_size or t.batch_size, momentum=t.momentum, amp=t.amp,
                        seed=recipe.model.init_seed, num_workers=t.num_workers, device=t.device, log=t.log)
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, augment="none"),
                               model=dataclasses.replace(recipe.model, freeze=1.0, probe=None),
                               train=train, sweep={}, search=None)


def probe_ingredient(recipe: Recipe) -> Ingredient | None:
    derived = probe_recipe(recipe)
    if derived is None:
        return None
    key = hashlib.sha256(json.dumps(resumable(derived.to_dict()), sort_keys=True).encode()).hexdigest()[:12]
    return Ingredient(0, f"{KIND}-{key}", derived, {}, sweep_ids=[])


def probe_file(recipe: Recipe, out: str | Path) -> Path | None:
    """Where `recipe`'s probe checkpoint lives under `out` (None without `model.probe`)."""
    item = probe_ingredient(recipe)
    return None if item is None else ingredient_file(out, recipe.name, item.id)


def load_probe(model: nn.Module, path: Path, start: str | None = None) -> nn.Module:
    """Put the probe's weights into `model` (built from the recipe's start): checked to have been trained
    from that very start. `start`: `model`'s fingerprint, when the caller has just computed it."""
    checkpoint = read_checkpoint(path)
    start = fingerprint(model) if start is None else start
    if checkpoint.kind != KIND or checkpoint.fingerprint != start:
        raise SoupError(f"{path}: this probed start was not trained from this recipe's start (fingerprint "
                        f"{checkpoint.fingerprint}, not {start}); delete its folder to probe again")
    with torch.no_grad():
        model.load_state_dict(checkpoint.state_dict())
    return model


def probe_places(checkpoint: Checkpoint, recipe: Recipe) -> list[Path]:
    """Where the probed start of `checkpoint` (built from `recipe`) may be, in the order searched: beside
    the checkpoint when it is an ingredient, and for a soup beside each member it records (the recorded
    path, and the same path taken from the soup's own folder) and in the default layout, where soups sit in
    `<out>/soups/` next to `<out>/<name>/`. Each member counts both as an ingredient
    (`<out>/<name>/<id>/`) and as a soup (`<out>/soups/`), so soups of soups find it too."""
    item = probe_ingredient(recipe)
    if item is None:
        return []
    recorded = [Path(m.path) for m in checkpoint.record.members if m.path is not None]
    files = [checkpoint.path, *(p for r in recorded for p in (r, checkpoint.path.parent / r))]
    places = [place for file in files for place in (file.parent.parent / item.id / INGREDIENT_FILE,
                                                    file.parent.parent / recipe.name / item.id / INGREDIENT_FILE)]
    return list(dict.fromkeys(places))


def probed_start(recipe: Recipe, checkpoint: Checkpoint) -> Path | None:
    """The probed start `checkpoint`'s ingredients began from (None when its recipe has no model.probe),
    found wherever the checkpoint lives (probe_places); one line naming where it looked when it is gone."""
    places = probe_places(checkpoint, recipe)
    if not places:
        return None
    for place in places:
        if place.is_file():
            return place
    looked = ", ".join(str(p.parent) for p in places)
    raise SoupError(f"{checkpoint.path} started from the probed start {places[0].parent.name}, which is missing "
                    f"(looked in {looked}); keep that folder beside the ingredients (or retrain it with soup train)")
