"""What every data path shares: the `Pipeline` the training loop feeds on, each epoch's shuffled order and
its per-rank share, and the plain path (decode and resize every image every epoch) that is always correct.
Training and the fast paths (soup.fast) import this; it imports neither."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from soup.models import distributed
from soup.models.inference import evaluate, make_loader
from soup.recipe.spec import Recipe


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, so a resumed run sees the
    same batches as an uninterrupted one. Under torchrun each rank trains on
    `distributed.rank_slice(epoch_order(...), rank, size)`, its share of this one global order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class EpochSampler(Sampler[int]):
    """The epoch order, or under torchrun this rank's share of it; one process sees the whole order."""

    def __init__(self, n: int, seed: int, rank: int | None = None, world_size: int | None = None):
        current = distributed.world()
        self.rank = current.rank if rank is None else rank
        self.world_size = current.size if world_size is None else world_size
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self) -> Iterator[int]:
        return iter(distributed.rank_slice(epoch_order(self.n, self.seed, self.epoch), self.rank,
                                           self.world_size))

    def __len__(self) -> int:
        return distributed.rank_count(self.n, self.world_size)


@dataclass
class Pipeline:
    """What the training loop feeds on. The plain pipeline decodes images every epoch; faster ones
    (decoded-image and frozen-prefix caches) plug in through `soup.fast.build.build_pipeline` with the same shape."""

    model: nn.Module  # forward(inputs) -> logits; shares its trainable parameters with the full model
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> batches on device
    evaluate: Callable[[], dict]  # val scores of the current weights
    steps_per_epoch: int
    description: str


def plain_pipeline(recipe: Recipe, model: nn.Module, train_set: Dataset, val_set: Dataset,
                   device: torch.device) -> Pipeline:
    t = recipe.train
    sampler = EpochSampler(len(train_set), t.seed)
    loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                        pin_memory=device.type == "cuda")
    val_loader = make_loader(val_set, t.batch_size * 2, t.num_workers, device)

    def train_batches(epoch: int):
        sampler.epoch = epoch
        for images, targets in loader:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    return Pipeline(model, train_batches, lambda: evaluate(model, val_loader, device), len(loader),
                    "plain: decode and resize every image every epoch")
