"""The pipeline builder: for each recipe and model, the fastest data path that is valid, else the plain
one (soup.data.pipeline.plain_pipeline, always correct).

  prefix cache    data.augment none, no mixup/cutmix, the frozen part a block prefix of a backbone family
                  soup can cut (ViT, DinoV2, SwinV2: soup.models.families) that computes
                  the same in train and eval mode: training runs the suffix on stored fp32 tokens
                  (what the full forward's frozen blocks compute; evaluation is exactly the full model's)
  decoded images  otherwise, for the course's image folders: images decoded and resized once; with
                  data.augment none the batches are bit-identical to the plain path's; with random
                  augmentation the store is a little larger where crops need it (soup.data.augment.store_size)
                  and each batch is augmented on the device (soup.data.augment.DeviceAugment), which equals
                  the plain path's PIL augmentation in distribution, not bit for bit
  plain           --no-cache, data the caches do not cover, or no writable cache folder

Every path draws epoch `e`'s batches as the plain path's EpochSampler does (this rank's share of
epoch_order(n, seed, e)), and the augmentation draws from augment_generator(seed, rank, epoch): a
resumed run and each DDP rank get reproducible streams of their own. The val pass never augments.
Batches are gathered with index tensors that already live where the store does (one copy per epoch,
not per batch), so the device can run ahead of the host.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from soup.data.augment import DeviceAugment, augment_generator, store_size
from soup.data.folders import build_transform
from soup.data.pipeline import Pipeline, epoch_order, plain_pipeline
from soup.fast.decoded import Normalizer, decoded_images, decoded_on, move, plain_transform, unwrap
from soup.fast.prefix import SuffixModel, feature_config, find_prefix, prefix_features, to_device
from soup.fast.scorer import score_rows
from soup.fast.store import CacheUnavailable, human
from soup.models import distributed
from soup.models.families import wants_channels_last
from soup.recipe.spec import Recipe


def build_pipeline(recipe: Recipe, model: nn.Module, train_set: Dataset, val_set: Dataset,
                   device: torch.device, use_cache: bool = True) -> Pipeline:
    """The fastest valid pipeline (frozen-prefix features or decoded images); the plain one with
    --no-cache or for data the caches do not cover (its description then says why)."""
    if not use_cache:
        return _plain(recipe, model, train_set, val_set, device, "--no-cache")
    try:
        found = _fast(recipe, model, train_set, val_set, device)
    except CacheUnavailable as err:
        found = str(err)
    if isinstance(found, Pipeline):
        return found
    return _plain(recipe, model, train_set, val_set, device, found)


def _plain(recipe, model, train_set, val_set, device, why: str) -> Pipeline:
    pipeline = plain_pipeline(recipe, model, train_set, val_set, device)
    return dataclasses.replace(pipeline, description=f"{pipeline.description} ({why})")


def batch_iterator(store: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, load: Callable,
                   device: torch.device, seed: int, batch_size: int,
                   augment: DeviceAugment | None = None) -> tuple[Callable, int]:
    """(train_batches, steps_per_epoch) drawing exactly what the plain path's EpochSampler draws:
    consecutive slices of this rank's share of epoch_order(n, seed, epoch); `augment` (uint8 in, uint8
    out, on the device) runs before `load` normalises."""
    w = distributed.world()
    at_store, on_device = rows.to(store.device), rows.to(device)
    device_targets = targets.to(device)

    def train_batches(epoch: int):
        order = torch.as_tensor(distributed.rank_slice(epoch_order(len(rows), seed, epoch), w.rank, w.size),
                                dtype=torch.long)
        gather_rows = at_store[order.to(store.device)]
        target_rows = on_device[move(order, device)]
        generator = augment_generator(seed, w.rank, epoch) if augment is not None else None
        for start in range(0, len(order), batch_size):
            x = store.index_select(0, gather_rows[start:start + batch_size])
            if augment is not None:
                x = augment(move(x, device), generator)
            yield load(x), device_targets.index_select(0, target_rows[start:start + batch_size])
    return train_batches, math.ceil(distributed.rank_count(len(rows), w.size) / batch_size)


def _fast(recipe: Recipe, model: nn.Module, train_set: Dataset, val_set: Dataset,
          device: torch.device) -> Pipeline | str:
    """The fastest cached pipeline, or why none applies."""
    (train_folder, train_idx), (val_folder, val_idx) = unwrap(train_set), unwrap(val_set)
    if not all(hasattr(f, "samples") and hasattr(f, "root") for f in (train_folder, val_folder)):
        return "not an image folder"
    transform = plain_transform(val_folder)
    if transform is None or not _train_transform_known(recipe, train_folder, transform):
        return "a transform the caches do not reproduce"
    rows = (torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(val_idx, dtype=torch.long))
    t = recipe.train
    why = (f"data.augment {recipe.data.augment} changes the images before the frozen prefix"
           if recipe.data.augment != "none" else
           "train.mixup/cutmix mix the images before the frozen prefix" if t.mixup > 0 or t.cutmix > 0 else None)
    if why is None:
        split, why = find_prefix(model.backbone, transform[0])
        if split is not None:
            pipeline = _prefix_pipeline(recipe, split, model, (train_folder, val_folder), rows, transform, device)
            if pipeline is not None:
                return pipeline
            why = "the prefix does not reproduce this backbone's forward"
    return _decoded_pipeline(recipe, model, (train_folder, val_folder), rows, transform, device, why)


def _train_transform_known(recipe: Recipe, train_folder: Dataset, val_transform: tuple) -> bool:
    """Whether the train folder's transform is the one the recipe's cached path reproduces: the val
    folder's plain resize (augment none), or exactly soup.data.folders.build_transform's augmentation."""
    if recipe.data.augment == "none":
        return plain_transform(train_folder) == val_transform
    expected = build_transform(recipe.data, train=True)
    return (val_transform[0] == recipe.data.image_size
            and repr(getattr(train_folder, "transform", None)) == repr(expected))


def _prefix_pipeline(recipe: Recipe, split, model: nn.Module, folders: tuple, rows: tuple, transform: tuple,
                     device: torch.device) -> Pipeline | None:
    t, eval_batch = recipe.train, recipe.train.batch_size * 2
    config = feature_config(recipe.model.backbone, recipe.model.kwargs)
    train_f = prefix_features(split, folders[0], transform, device, eval_batch, t.num_workers, config=config)
    val_f = (prefix_features(split, folders[1], transform, device, eval_batch, t.num_workers, config=config)
             if train_f is not None else None)
    if train_f is None or val_f is None:
        return None
    suffix = SuffixModel(model, split)
    fresh = "computed now" if train_f.built or val_f.built else "shared with an earlier run"
    where = train_f.where if train_f.where == val_f.where else f"{train_f.where}/{val_f.where}"
    batches, steps = batch_iterator(train_f.tokens, train_f.targets, rows[0], to_device(device), device, t.seed,
                                    t.batch_size)
    return Pipeline(
        suffix, batches, _suffix_scores(suffix, val_f, rows[1], device, eval_batch), steps,
        f"prefix cache: {split.cached_text()}, {human(train_f.nbytes + val_f.nbytes)} on {where} ({fresh}); "
        f"training runs {split.rest_text()}")


def _suffix_scores(suffix: SuffixModel, features, rows: torch.Tensor, device: torch.device,
                   batch_size: int) -> Callable[[], dict]:
    """Val scores of the current weights from stored prefix tokens: the trained part runs, nothing else."""
    positions, load = features.positions(rows), to_device(device)
    return lambda: score_rows(suffix, features.tokens, features.targets, positions, load, device, batch_size)


def _decoded_pipeline(recipe: Recipe, model: nn.Module, folders: tuple, rows: tuple, transform: tuple,
                      device: torch.device, why: str) -> Pipeline:
    t, eval_batch, augment_name = recipe.train, recipe.train.batch_size * 2, recipe.data.augment
    size, mean, std = transform
    stored = store_size(augment_name, size)
    augment = DeviceAugment(augment_name, size) if augment_name != "none" else None
    train_d = decoded_on(decoded_images(folders[0], stored, t.num_workers), device)
    val_d = decoded_images(folders[1], size, t.num_workers)  # moved to the device only if val needs images
    convnet = device.type == "cuda" and wants_channels_last(model.backbone)
    if convnet:  # checkpoints stay contiguous (fp32_state)
        model.to(memory_format=torch.channels_last)
    load = Normalizer(mean, std, device, channels_last=convnet)
    nbytes = train_d.nbytes + (val_d.nbytes if val_d.key != train_d.key else 0)
    where = str(train_d.images.device) if train_d.images.device.type == "cuda" else "memory map"
    batches, steps = batch_iterator(train_d.images, train_d.targets, rows[0], load, device, t.seed, t.batch_size,
                                    augment)
    evaluate, val_path = _val_pass(recipe, model, folders[1], rows[1], transform, device, val_d.key)
    if evaluate is None:
        val_images = decoded_on(val_d, device)

        def evaluate():
            return score_rows(model, val_images.images, val_images.targets, rows[1], load, device, eval_batch)
    sizes = f"{size} px" if stored == size else f"{stored} px (train, for crops) and {size} px (val)"
    augmented = (f"; {augment_name} on the {device.type} per batch (equal to the PIL path in distribution)"
                 if augment is not None else "")
    return Pipeline(
        model, batches, evaluate, steps,
        f"decoded-image cache: {len(train_d.images) + len(val_d.images)} images at {sizes}, {human(nbytes)} "
        f"({where}){augmented}; no prefix cache for training: {why}{val_path}")


def _val_pass(recipe: Recipe, model: nn.Module, folder: Dataset, rows: torch.Tensor, transform: tuple,
              device: torch.device, dkey: str) -> tuple[Callable[[], dict] | None, str]:
    """(val scores through the frozen prefix's cached tokens, how) for a pipeline whose training cannot
    use them, or (None, "") where they do not apply. Val images are never augmented nor mixed, and a
    frozen prefix's weights do not move, so its eval-mode tokens stay valid for every epoch's val pass:
    each pass runs the trained part only, on fp32 tokens: the figures are the full model's own."""
    split, _ = find_prefix(model.backbone, transform[0], eval_only=True)
    if split is None:
        return None, ""
    t, eval_batch = recipe.train, recipe.train.batch_size * 2
    try:
        features = prefix_features(split, folder, transform, device, eval_batch, t.num_workers, dkey,
                                   config=feature_config(recipe.model.backbone, recipe.model.kwargs))
    except CacheUnavailable:  # no room for its store: val runs the whole model, training is unaffected
        features = None
    if features is None:
        return None, ""
    return (_suffix_scores(SuffixModel(model, split), features, rows, device, eval_batch),
            f"; val: prefix cache ({split.cached_text()}, {human(features.nbytes)}), then {split.rest_text()}")
