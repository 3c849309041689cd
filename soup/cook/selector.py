"""The held-out judge of a soup: scores weight sets on the split that selects the soup (val or holdout)
with one model and one loader, and the caches, shared by every weight set a method tries; each weight set
first gets BatchNorm statistics of its own (soup.cook.batchnorm), so what selection scores is what is
written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from soup.cook.batchnorm import StatsReset, batchnorm_layers, train_split
from soup.models.checkpoint import Checkpoint
from soup.models.metrics import scores
from soup.score.evaluator import Evaluator, Predictions, predictions


class Selector:
    """Scores weights on the held-out set that selects the soup: an Evaluator bound to one template, so
    the 2N-1 weight sets of a greedy soup share one model, one loader and the caches."""

    def __init__(self, template: Checkpoint, split: str = "val", root: str | Path | None = None,
                 device: torch.device | None = None, batch_size: int = 128, num_workers: int = 0,
                 use_cache: bool = True, members: list[Checkpoint] | None = None, bn_images: int | None = None,
                 console: Console | None = None, reset: StatsReset | None = None, subset: list[int] | None = None,
                 label: str | None = None):
        """`members` with `bn_images`: re-estimate BatchNorm statistics no member supplies as they are on
        that many train images (None: keep them as mixed); `reset`: share another selector's. `subset`: the
        positions in the split of the only images it scores, and `label` what the methods call them."""
        self.template, self.split = template, label or split
        self.evaluator = Evaluator(split, root, device, batch_size, num_workers, use_cache, subset)
        self.device = self.evaluator.device
        data = self.evaluator.data_for(template)
        self.root, self.loader = str(data.root), data.loader
        self.model, self.cached = self.evaluator.model_for(template)
        self.has_batchnorm = bool(batchnorm_layers(self.model))
        self.reset = reset
        if reset is None and bn_images is not None and self.has_batchnorm:
            self.reset = StatsReset(self.model, members or [template], train_split(template, self.root),
                                    self.device, bn_images, batch_size, num_workers, console)

    def prepare(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights as they are scored and written: with BatchNorm statistics fitted to them."""
        return self.reset(state_dict) if self.reset is not None else state_dict

    def __call__(self, state_dict: dict[str, torch.Tensor]) -> dict:
        return self.evaluator(self.template, self.prepare(state_dict))

    def logits(self, state_dict: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
        return self.evaluator.logits(self.template, self.prepare(state_dict))

    def judged(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, Predictions]:
        """The scores and the per-image predictions, so that two weight sets can be compared pairwise."""
        logits, targets = self.logits(state_dict)
        return scores(logits, targets), predictions(logits, targets, self.template.classes)
