"""Scoring checkpoints on one split: `Evaluator` builds each split's loader and each architecture's model
once, and scores weights through the fast paths' caches (soup.fast) where they apply, else a plain
forward; `Predictions` keeps one row's per-image outcome so that two rows on the same images pair up.
Cooking selects with it (soup.cook) and the reports are built on it (soup.judge).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from soup.data.folders import load_split
from soup.errors import SoupError
from soup.fast.prefix import feature_config
from soup.fast.scorer import CachedScorer
from soup.fast.store import CacheUnavailable
from soup.models.backbones import model_from_checkpoint
from soup.models.checkpoint import Checkpoint
from soup.models.inference import finite_logits, make_loader, predict, resolve_device
from soup.models.metrics import scores
from soup.recipe.spec import DataConfig, recipe_from_dict
from soup.score.stats import confidences


@dataclass
class SplitData:
    """One split's loader, shared by every checkpoint that reads its images the same way."""

    loader: DataLoader
    split: str
    root: Path


class Evaluator:
    """Evaluates checkpoints on one split, building each data pipeline once."""

    def __init__(self, split: str = "val", root: str | Path | None = None, device: torch.device | None = None,
                 batch_size: int = 128, num_workers: int = 0, use_cache: bool = True, subset: list[int] | None = None):
        """`subset`: positions in the split of the only images scored, in that order (e.g. one half of val
        that `soup cook --best` cross-fits on); None: the whole split."""
        self.split, self.root, self.subset = split, root, subset
        self.device = device or resolve_device()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.use_cache = use_cache
        self._data: dict[tuple, SplitData] = {}
        self._models: dict[tuple, torch.nn.Module] = {}
        self._scorers: dict[tuple, object] = {}

    def data_for(self, checkpoint: Checkpoint) -> SplitData:
        cfg: DataConfig = recipe_from_dict(checkpoint.recipe).data
        root = Path(self.root if self.root is not None else cfg.root)
        key = (str(root), cfg.image_size, tuple(cfg.mean), tuple(cfg.std), cfg.holdout, cfg.holdout_seed,
               tuple(checkpoint.classes))
        if key not in self._data:
            dataset = load_split(cfg, self.split, root=root, classes=checkpoint.classes)
            if self.subset is not None:
                dataset = Subset(dataset, self.subset)
            self._data[key] = SplitData(make_loader(dataset, self.batch_size, self.num_workers, self.device),
                                        self.split, root)
        return self._data[key]

    def model_for(self, checkpoint: Checkpoint) -> tuple[torch.nn.Module, object | None]:
        """One model (and, with use_cache, one cached scorer) for every checkpoint of an architecture, start
        and freeze: images are decoded once per split and, for a frozen ViT prefix, its features computed
        once (soup.fast); each checkpoint only loads its weights into the shared model."""
        recipe = recipe_from_dict(checkpoint.recipe)
        data = self.data_for(checkpoint)
        key = (id(data), checkpoint.backbone, json.dumps(recipe.model.kwargs, sort_keys=True),
               checkpoint.fingerprint, recipe.model.freeze)
        if key not in self._models:
            model = model_from_checkpoint(checkpoint).to(self.device)
            self._models[key] = model
            self._scorers[key] = None
            if self.use_cache:
                try:
                    self._scorers[key] = CachedScorer(model, data.loader.dataset, recipe.model.freeze,
                                                      self.device, self.batch_size, self.num_workers,
                                                      feature_config(checkpoint.backbone, recipe.model.kwargs))
                except CacheUnavailable:
                    pass
        return self._models[key], self._scorers[key]

    def logits(self, checkpoint: Checkpoint, state_dict: dict | None = None) -> tuple[torch.Tensor, list]:
        return self.view_logits(checkpoint, (None,), state_dict)[0]

    def view_logits(self, checkpoint: Checkpoint, views, state_dict: dict | None = None) -> list[tuple]:
        """(logits, targets) for each test-time view (soup.models.views; None: the image as it is), the
        weights loaded once."""
        model, scorer = self.model_for(checkpoint)
        try:
            model.load_state_dict(state_dict if state_dict is not None else checkpoint.state_dict())
        except RuntimeError as err:
            raise SoupError(f"{checkpoint.path}: weights do not fit {checkpoint.backbone} "
                            f"({str(err).splitlines()[0]})") from None
        # Weights given for a template are a weight set built on it (a soup being cooked), not the file.
        what = str(checkpoint.path) if state_dict is None else f"a weight set built on {checkpoint.path}"
        return [(finite_logits(logits, what), targets)
                for logits, targets in (self._view_logits(checkpoint, model, scorer, view) for view in views)]

    def _view_logits(self, checkpoint: Checkpoint, model, scorer, view) -> tuple[torch.Tensor, list]:
        if scorer is not None:
            try:
                logits, targets = scorer.logits(view)
                return logits, targets.tolist()
            except CacheUnavailable:  # its decoded store could not be made (full disk): the plain forward
                pass
        return predict(model, self.data_for(checkpoint).loader, self.device, view)

    def __call__(self, checkpoint: Checkpoint, state_dict: dict | None = None) -> dict:
        logits, targets = self.logits(checkpoint, state_dict)
        return scores(logits, targets)


@dataclass
class Predictions:
    """One row's per-image outcome, in the split's image order: rows reading the same images pair up."""

    predicted: torch.Tensor  # (n,) class index
    confidence: torch.Tensor  # (n,) its probability, after the row's temperature
    targets: torch.Tensor  # (n,)
    classes: list[str]

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.targets

    def pairs_with(self, other: "Predictions") -> bool:
        return self.classes == other.classes and torch.equal(self.targets, other.targets)


def predictions(logits: torch.Tensor, targets, classes: list[str]) -> Predictions:
    predicted, confidence = confidences(logits)
    return Predictions(predicted, confidence, torch.as_tensor(targets), classes)
