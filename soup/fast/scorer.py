"""Scoring weights from the fast paths' stores: each training epoch's val pass (soup.fast.build) and
cooking's `CachedScorer`, which scores every checkpoint of one architecture, start and freeze on one
split (soup.judge.evaluate) through the prefix features when the weights' prefix is the one they were
computed with, else a full forward over the decoded images. Same arithmetic as soup.models.inference.predict (same eval_dtype).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from soup.fast.decoded import Normalizer, decoded_images, decoded_key, decoded_on, gather, plain_transform, unwrap
from soup.fast.prefix import SuffixModel, find_prefix, prefix_features, to_device
from soup.fast.store import CacheUnavailable
from soup.models.backbones import freeze_prefix
from soup.models.inference import eval_dtype
from soup.models.views import apply_view, is_identity
from soup.models.metrics import scores


def score_rows(model: nn.Module, store: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, load,
               device: torch.device, batch_size: int) -> dict:
    """soup.models.inference.evaluate over cached inputs: same batches' arithmetic, same scores."""
    return scores(logits_rows(model, store, rows, load, device, batch_size), targets[rows])


@torch.no_grad()
def logits_rows(model: nn.Module, store: torch.Tensor, rows: torch.Tensor, load, device: torch.device,
                batch_size: int) -> torch.Tensor:
    """fp32 logits on the CPU for `rows` of a cached store, in order (as soup.models.inference.predict); copied
    to the CPU once, at the end, so the device runs ahead of the host."""
    was_training = model.training
    model.eval()
    dtype, logits = eval_dtype(device), []
    try:
        for start in range(0, len(rows), batch_size):
            x = load(gather(store, rows[start:start + batch_size]))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(logits).cpu()


class CachedScorer:
    """Scores weights of one architecture on one split from the caches: through the prefix features
    when the weights' prefix equals the one they were computed with (ingredients of one start and
    freeze, and their averages), else a full forward over the decoded images."""

    def __init__(self, model: nn.Module, dataset: Dataset, freeze: float, device: torch.device,
                 batch_size: int, num_workers: int = 0, config: dict | None = None):
        folder, idx = unwrap(dataset)
        transform = plain_transform(folder) if hasattr(folder, "samples") else None
        if transform is None:
            raise CacheUnavailable("not a plain image folder")
        self.model, self.device, self.batch_size = model, device, batch_size
        self.rows = torch.as_tensor(idx, dtype=torch.long)
        size, mean, std = transform
        dkey = decoded_key(folder, size)
        # Decoded images are needed only for a full forward (weights with another prefix): load on demand.
        self._decoded, self._decode_failed = None, None
        self._decode = lambda: decoded_on(decoded_images(folder, size, num_workers, dkey), device)
        self.normalize = Normalizer(mean, std, device)
        self.split, self.features, self.reference = None, None, []
        flags = [p.requires_grad for p in model.backbone.parameters()]
        freeze_prefix(model.backbone, freeze)  # the k the ingredients trained with
        try:
            split, why = find_prefix(model.backbone, size, eval_only=True)  # scoring never trains
        finally:
            for p, flag in zip(model.backbone.parameters(), flags):
                p.requires_grad_(flag)
        # Each test-time view's tokens (soup.models.views) are computed when first asked for.
        self._views: dict[str, object] = {}
        self._view_features = lambda view: prefix_features(split, folder, transform, device, batch_size,
                                                           num_workers, dkey, idx, config, view)
        if split is not None:
            features = self._view_features(None)
            if features is not None:
                self.split, self.features = split, features
                self.suffix = SuffixModel(model, split)
                self.reference = [t.detach().clone() for t in split.prefix_state()]
        self.description = (f"prefix cache: {split.cached_text()}" if self.features is not None
                            else "decoded-image cache")

    def prefix_unchanged(self) -> bool:
        # Exactly equal, or the tokens are not these weights' own: soups keep a tensor that all their
        # members share bit for bit (soup.cook.weights.weighted_average), so their frozen prefix qualifies.
        return all(torch.equal(a, b) for a, b in zip(self.split.prefix_state(), self.reference))

    def __call__(self) -> dict:
        """Scores of the weights now loaded in the model."""
        return scores(*self.logits())

    def logits(self, view: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of the weights now loaded in the model, in the split's order; with `view`, of
        that test-time view of each image."""
        if self.features is not None and self.prefix_unchanged():
            features = self.features
            if not is_identity(view):
                if view not in self._views:  # the prefix is the reference one: its tokens are the cache's
                    self._views[view] = self._view_features(view)
                features = self._views[view]
            rows = features.positions(self.rows)
            return (logits_rows(self.suffix, features.tokens, rows, to_device(self.device), self.device,
                                self.batch_size), features.targets[rows])
        if self._decode_failed is not None:  # tried once (e.g. no room on the disk): not again per weight set
            raise self._decode_failed
        if self._decoded is None:
            try:
                self._decoded = self._decode()
            except CacheUnavailable as err:
                self._decode_failed = err
                raise
        load = lambda images: apply_view(view, self.normalize(images))  # noqa: E731
        return (logits_rows(self.model, self._decoded.images, self.rows, load, self.device,
                            self.batch_size), self._decoded.targets[self.rows])
