"""BatchNorm statistics that fit a soup's weights. A weight average keeps the average of its members'
running statistics, which are not the statistics of the averaged weights (REPAIR, Jordan et al. 2023), so
every weight set cooking scores or writes goes through `StatsReset` first: the running statistics of each
BatchNorm layer that no member supplies as it is (the mix of two or more members that differ there) are
re-estimated by one no-grad pass over a fixed, seeded subset of the train images (never the selection
split, never val), with the evaluation transform, the cumulative mean of torch.optim.swa_utils.update_bn
(momentum None) and only those layers in train mode, so dropout and drop-path stay off. A layer whose
statistics are one member's exactly (one ingredient alone, a frozen prefix every member shares) is kept
bit for bit; a model without BatchNorm passes through untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from safetensors import safe_open
from torch.utils.data import Dataset, Subset

from soup.data.folders import load_split
from soup.errors import SoupError
from soup.fast.decoded import (Normalizer, decoded_images, decoded_on, decoded_rows, gather, plain_transform,
                               unwrap)
from soup.fast.store import CacheUnavailable
from soup.models.checkpoint import Checkpoint
from soup.models.inference import eval_dtype, make_loader
from soup.recipe.spec import recipe_from_dict

# Images of the train split the statistics are measured on: 8 batches of 128, a few seconds a weight set
# for a ViT-B-sized convnet on a GPU, tens of seconds on a laptop CPU; more than the statistics of a
# 500-class task need to settle (SWAD uses 500 steps; REPAIR's gains come at a few thousand images).
DEFAULT_IMAGES = 1000
SEED = 0
STATS = ("running_mean", "running_var")


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer (timm's BatchNormAct2d and SyncBatchNorm included) that keeps statistics."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def chosen_rows(count: int, size: int, seed: int = SEED) -> list[int]:
    """`count` of `size` rows drawn without replacement by `seed`, in split order (all when fewer)."""
    if count >= size:
        return list(range(size))
    return sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def check_images(count) -> int | None:
    """--bn-images N: a whole number of images, at least 2 (None: no reset). A BatchNorm layer in train mode
    needs more than one value per channel: one image fails wherever a layer sees a 1x1 map or a vector."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 2):
        raise SoupError(f"--bn-images {count}: expected a whole number of train images, at least 2, since BatchNorm "
                        f"statistics need more than one image (default {DEFAULT_IMAGES}); --no-bn-reset keeps the "
                        "averaged statistics")
    return count


def batch_without_a_lone_image(rows: int, batch_size: int) -> int:
    """The largest batch size up to `batch_size` that leaves no batch of one image among `rows` (>= 2): a
    lone image cannot give train-mode statistics, and its batch would weigh as much as a full one."""
    while batch_size > 2 and rows % batch_size == 1:
        batch_size -= 1
    return batch_size


class StatsReset:
    """Re-estimates the statistics of the BatchNorm layers no member supplies as they are, on one model
    (the selector's), for every weight set given; a state it returned passes through a second time."""

    def __init__(self, model: nn.Module, ingredients: list[Checkpoint], dataset: Dataset, device: torch.device,
                 images: int = DEFAULT_IMAGES, batch_size: int = 128, num_workers: int = 0,
                 console: Console | None = None):
        self.model, self.device, self.num_workers = model, device, num_workers
        self.console = console or Console(quiet=True)
        self.layers = batchnorm_layers(model)
        self.known = _member_stats(ingredients, self.layers)
        if len(dataset) < 2:
            raise SoupError(f"the train split holds {len(dataset)} image(s), and re-estimating BatchNorm statistics "
                            "needs at least 2; add train images, or cook with --no-bn-reset")
        self.dataset, self.rows = dataset, chosen_rows(images, len(dataset))
        self.batch_size = batch_without_a_lone_image(len(self.rows), batch_size)
        self.requested = images
        self._batches = None
        self._done: list[tuple[dict, dict]] = []  # (state returned, its record), the latest two
        self.seconds: list[float] = []

    def files(self) -> list[str]:
        folder, idx = unwrap(self.dataset)
        return [str(Path(folder.samples[idx[row]][0]).relative_to(folder.root)) for row in self.rows]

    def knows(self, state: dict[str, torch.Tensor]) -> None:
        """Counts `state`'s statistics as a member's own too (the start a method mixes in)."""
        for name in self.layers:
            _remember(self.known[name], {s: state[f"{name}.{s}"].float() for s in STATS})

    def to_reset(self, state: dict[str, torch.Tensor]) -> list[str]:
        """The layers whose statistics in `state` are no member's own (bit for bit)."""
        return [name for name in self.layers
                if not _among({s: state[f"{name}.{s}"].float() for s in STATS}, self.known[name])]

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for done, _ in self._done:
            if done is state:
                return state
        names = self.to_reset(state)
        if not names:
            return state
        started = time.perf_counter()
        fresh = self._measure(state, names)
        self.seconds.append(time.perf_counter() - started)
        if len(self.seconds) == 1:
            self.console.print(f"  batchnorm: {len(names)} of {len(self.layers)} layers re-estimated on "
                               f"{len(self.rows)} train images for each mixed weight set "
                               f"({self.seconds[0]:.1f} s each; --no-bn-reset keeps averaged statistics)")
        self._done = self._done[-1:] + [(fresh, self._record(names))]
        return fresh

    def record(self, state: dict[str, torch.Tensor]) -> dict:
        """What the metadata says of `state`'s statistics: the layers re-estimated, on which images."""
        for done, record in self._done:
            if done is state:
                return record
        return self._record([])

    def _record(self, names: list[str]) -> dict:
        return {"layers": names, "of_layers": len(self.layers), "split": "train", "images": len(self.rows),
                "requested": self.requested, "seed": SEED, "batch_size": self.batch_size,
                "rule": "cumulative mean (momentum None), no grad, BatchNorm layers alone in train mode",
                "files": self.files()}

    @torch.no_grad()
    def _measure(self, state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        model, device = self.model, self.device
        model.load_state_dict(state)
        model.eval()
        saved = {}
        for name in names:
            layer = self.layers[name]
            saved[name] = layer.momentum
            layer.reset_running_stats()
            layer.momentum = None  # cumulative mean over the batches, as update_bn
            layer.train()
        dtype = eval_dtype(device)
        try:
            for images in self._images():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    model(images)
        finally:
            for name, momentum in saved.items():
                self.layers[name].momentum = momentum
            model.eval()
        fresh = dict(state)
        for name in names:
            layer = self.layers[name]
            for buffer in (*STATS, "num_batches_tracked"):
                value = getattr(layer, buffer)
                fresh[f"{name}.{buffer}"] = value.detach().to("cpu", copy=True).to(state[f"{name}.{buffer}"].dtype)
        return fresh

    def _images(self):
        """The chosen train images as model input, batch by batch: from the decoded-image store where
        the folder's transform is the plain one (the same bytes as the plain path), else decoded."""
        if self._batches is None:
            self._batches = self._decoded() or self._plain
        return self._batches()

    def _decoded(self):
        folder, idx = unwrap(self.dataset)
        transform = plain_transform(folder) if hasattr(folder, "samples") else None
        if transform is None:
            return None
        size, mean, std = transform
        rows = [idx[row] for row in self.rows]
        try:
            # The train folder's store when training built it; else only the chosen images, decoded once:
            # a reset of 1000 images never builds the store of a 20,000-image folder.
            store = decoded_images(folder, size, self.num_workers, build=False)
        except CacheUnavailable:
            store = None
        if store is not None:
            images, rows = decoded_on(store, self.device).images, torch.as_tensor(rows, dtype=torch.long)
        else:
            images = decoded_rows(folder, size, rows, self.num_workers)
            rows = torch.arange(len(rows))
        normalize = Normalizer(mean, std, self.device)
        step = self.batch_size
        return lambda: (normalize(gather(images, rows[i:i + step])) for i in range(0, len(rows), step))

    def _plain(self):
        loader = make_loader(Subset(self.dataset, self.rows), self.batch_size, self.num_workers, self.device)
        return (images.to(self.device, non_blocking=True) for images, _ in loader)


def _member_stats(ingredients: list[Checkpoint], layers: dict[str, _BatchNorm]) -> dict[str, list[dict]]:
    """Per layer, the distinct statistics the ingredients hold (read one tensor at a time)."""
    known: dict[str, list[dict]] = {name: [] for name in layers}
    for checkpoint in ingredients:
        with safe_open(str(checkpoint.path), framework="pt") as f:
            for name in layers:
                _remember(known[name], {s: f.get_tensor(f"{name}.{s}").float() for s in STATS})
    return known


def _among(stats: dict[str, torch.Tensor], known: list[dict]) -> bool:
    """Whether a layer's `stats` are, bit for bit, one of the `known` ones."""
    return any(all(torch.equal(stats[s], other[s]) for s in STATS) for other in known)


def _remember(known: list[dict], stats: dict[str, torch.Tensor]) -> None:
    if not _among(stats, known):
        known.append(stats)


def train_split(template: Checkpoint, root: str | Path | None) -> Dataset:
    """The train images a reset measures on: the recipe's train split (its holdout slice left out) with
    the evaluation transform."""
    cfg = recipe_from_dict(template.recipe).data
    return load_split(cfg, "train", root=root, classes=template.classes)


def describe_reset(record) -> str | None:
    """One line on a soup's BatchNorm statistics (its metadata's bn_reset), for inspect, report and card."""
    if not isinstance(record, dict):
        return None
    layers = record.get("layers") or []
    if record.get("off"):
        return "BatchNorm statistics: the members' average, not re-estimated (--no-bn-reset)"
    if not layers:
        return "BatchNorm statistics: the members' own, kept as they are (no layer differed between members)"
    return (f"BatchNorm statistics: {len(layers)} of {record.get('of_layers', len(layers))} layers re-estimated "
            f"on {record.get('images')} {record.get('split', 'train')} images (seed {record.get('seed')}, batches "
            f"of {record.get('batch_size')})")
