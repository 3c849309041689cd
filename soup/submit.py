"""Submission: `Id,Category` predictions for every test image, as the course's Kaggle page expects."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from soup.backbones import model_from_checkpoint
from soup.checkpoint import Checkpoint, atomic_path
from soup.data import TestImages, build_transform
from soup.evaluate import make_loader, predict, resolve_device
from soup.recipe import recipe_from_dict


def predict_test(checkpoint: Checkpoint, data_root: str | Path | None = None,
                 device: torch.device | None = None, batch_size: int = 128) -> tuple[list[str], list[int]]:
    """(ids, class indices) for the test images, with the same preprocessing as evaluation."""
    device = device or resolve_device()
    cfg = recipe_from_dict(checkpoint.recipe).data
    images = TestImages(data_root if data_root is not None else cfg.root, build_transform(cfg))
    model = model_from_checkpoint(checkpoint).to(device)
    logits, ids = predict(model, make_loader(images, batch_size, 0, device), device)
    return ids, logits.argmax(dim=1).tolist()


def write_submission(path: str | Path, ids: list[str], categories: list[int]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Id", "Category"])
            writer.writerows(zip(ids, categories))
    return Path(path)
