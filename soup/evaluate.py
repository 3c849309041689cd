"""Evaluation: batched, no grad, AMP on GPU; top-1, top-5 and loss for checkpoints, soups and ensembles."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from soup.backbones import model_from_checkpoint
from soup.calibrate import temperature_of
from soup.checkpoint import Checkpoint
from soup.data import load_split
from soup.errors import SoupError
from soup.fast.prefix import feature_config
from soup.fast.scorer import CachedScorer
from soup.fast.store import CacheUnavailable
from soup.inference import make_loader, predict, resolve_device
from soup.metrics import scores
from soup.recipe import DataConfig, recipe_from_dict
from soup.stats import confidences, expected_calibration_error


@dataclass
class SplitData:
    """One split's loader, shared by every checkpoint that reads its images the same way."""

    loader: DataLoader
    split: str
    root: Path


class Evaluator:
    """Evaluates checkpoints on one split, building each data pipeline once."""

    def __init__(self, split: str = "val", root: str | Path | None = None, device: torch.device | None = None,
                 batch_size: int = 128, num_workers: int = 0, use_cache: bool = True):
        self.split, self.root = split, root
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
        model, scorer = self.model_for(checkpoint)
        try:
            model.load_state_dict(state_dict if state_dict is not None else checkpoint.state_dict())
        except RuntimeError as err:
            raise SoupError(f"{checkpoint.path}: weights do not fit {checkpoint.backbone} "
                            f"({str(err).splitlines()[0]})") from None
        if scorer is not None:
            try:
                logits, targets = scorer.logits()
                return logits, targets.tolist()
            except CacheUnavailable:  # its decoded store could not be made (full disk): the plain forward
                pass
        return predict(model, self.data_for(checkpoint).loader, self.device)

    def __call__(self, checkpoint: Checkpoint, state_dict: dict | None = None) -> dict:
        logits, targets = self.logits(checkpoint, state_dict)
        return scores(logits, targets)


def selection_split(checkpoint: Checkpoint) -> str | None:
    """The split whose scores chose or fitted this soup's weights, if any. A uniform or stock soup cooked
    with data was only checked on its split ("chose": false); soups from before that record count as chosen."""
    selection = checkpoint.meta.get("selection") or {}
    return selection.get("split") if selection.get("chose", True) else None


def ensemble_logits(members: list[tuple[Checkpoint, torch.Tensor]]) -> tuple[torch.Tensor, str]:
    """The ensemble's logits and how they were combined. One architecture: the mean of logits (the paper's
    reference). Several: the mean of probabilities, since each architecture scales its logits its own way;
    returned as log-probabilities, so top-k are the ensemble's and the loss is its NLL."""
    first = members[0][0]
    for checkpoint, _ in members[1:]:
        if checkpoint.classes != first.classes:
            raise SoupError(f"--ensemble: {checkpoint.path} and {first.path} have different class lists; an "
                            "ensemble needs the same classes in the same order")
    backbones = list(dict.fromkeys(c.backbone for c, _ in members))
    if len(backbones) == 1:
        return torch.stack([lg for _, lg in members]).mean(0), "mean of logits"
    probabilities = torch.stack([lg.softmax(dim=1) for _, lg in members]).mean(0)
    return probabilities.clamp_min(1e-12).log(), f"mean of probabilities, {len(backbones)} architectures"


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


def _row(logits: torch.Tensor, targets: list, classes: list[str], **fields) -> tuple[dict, Predictions]:
    outcome = predictions(logits, targets, classes)
    result = scores(logits, targets)
    return {**fields, **result, "nll": result["loss"],
            "ece": expected_calibration_error(outcome.confidence, outcome.correct)}, outcome


def evaluate_rows(checkpoints: list[Checkpoint], evaluator: Evaluator,
                  ensemble: bool = False) -> list[tuple[dict, Predictions]]:
    """One (row, per-image predictions) per checkpoint, and with `ensemble` one for the ensemble of the
    ingredients (of every checkpoint when fewer than two are ingredients, e.g. a DinoV2 soup and a SwinV2
    soup). A checkpoint's stored temperature divides its logits first (top-1 unchanged, NLL/ECE not)."""
    rows, all_logits, targets = [], [], None
    temperatures = [temperature_of(c) for c in checkpoints]  # a bad one stops the command before any work
    for checkpoint, temperature in zip(checkpoints, temperatures):
        logits, targets = evaluator.logits(checkpoint)
        logits = logits / temperature
        rows.append(_row(logits, targets, checkpoint.classes,
                         name=checkpoint.name,
                         path=str(checkpoint.path),
                         kind=checkpoint.kind,
                         members=len(checkpoint.meta.get("members", [])) or 1,
                         split=evaluator.split,
                         selection_set=selection_split(checkpoint) == evaluator.split,
                         temperature=temperature))
        all_logits.append((checkpoint, logits, targets))
    if ensemble:
        members = [m for m in all_logits if m[0].kind == "ingredient"]
        members = members if len(members) >= 2 else all_logits
        if len(members) < 2:
            raise SoupError("--ensemble needs at least two checkpoints (ingredients, or soups of one class list)")
        for checkpoint, _, member_targets in members[1:]:
            if member_targets != members[0][2]:
                raise SoupError(f"--ensemble: {checkpoint.path} and {members[0][0].path} read different "
                                f"{evaluator.split} images; pass --data ROOT so that all read the same ones")
        # The paper's reference: the ensemble costs one forward pass per member, a soup only one.
        combined, how = ensemble_logits([(c, lg) for c, lg, _ in members])
        rows.append(_row(combined, members[0][2], members[0][0].classes,
                         name=f"ensemble ({how})", path="", kind="ensemble", members=len(members),
                         member_names=[c.name for c, _, _ in members], split=evaluator.split,
                         selection_set=False, temperature=1.0))
    return rows


def eval_rows(checkpoints: list[Checkpoint], evaluator: Evaluator, ensemble: bool = False) -> list[dict]:
    """The rows of `evaluate_rows`, without the per-image predictions."""
    return [row for row, _ in evaluate_rows(checkpoints, evaluator, ensemble)]
