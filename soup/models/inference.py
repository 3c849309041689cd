"""Running a model over a loader: the device to run on, batched no-grad prediction and its scores.
Training (each epoch's val pass), evaluation and submission share these."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from soup.errors import SoupError
from soup.models.metrics import scores
from soup.models.views import apply_view


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SoupError(f"train.device: unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SoupError(f"train.device is {name} but CUDA is not available here; use train.device=auto")
    return device


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                shuffle: bool = False, generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0 and shuffle)


def eval_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast of every evaluation pass: bf16 on a GPU, none (fp32) on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device,
            view: str | None = None) -> tuple[torch.Tensor, list]:
    """fp32 logits on the CPU for every item, and the items' labels (targets or ids), in loader order;
    with `view`, of that test-time view of each image (soup.models.views)."""
    model.eval()
    dtype, logits, labels = eval_dtype(device), [], []
    for images, batch_labels in loader:
        images = apply_view(view, images.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images)
        logits.append(out.float().cpu())
        labels.extend(batch_labels.tolist() if torch.is_tensor(batch_labels) else batch_labels)
    return torch.cat(logits), labels


class NonFiniteLogits(SoupError):
    """Weights whose logits hold NaN or inf: a NaN logit scores as a class and its NLL as nan, so a figure
    from them would be a wrong figure, never a bad one. `named` says whose weights they were."""

    def __init__(self, what: str, bad: int, total: int):
        self.bad, self.total = bad, total
        super().__init__(f"{what}: its weights give NaN or infinite logits on {bad} of {total} images, so no figure "
                         "from them would mean anything; a BatchNorm running_var below zero or a tensor holding "
                         "NaN/inf does this (retrain it, or import it again from a sound source)")

    def named(self, what: str) -> "NonFiniteLogits":
        return NonFiniteLogits(what, self.bad, self.total)


def finite_logits(logits: torch.Tensor, what: str) -> torch.Tensor:
    """`logits` when every one is a number; else NonFiniteLogits naming `what` (the checkpoint)."""
    bad = (~torch.isfinite(logits)).any(dim=1)
    if bool(bad.any()):
        raise NonFiniteLogits(what, int(bad.sum()), len(logits))
    return logits


def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict:
    logits, targets = predict(model, loader, device)
    return scores(logits, targets)
