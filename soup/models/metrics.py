"""Scores of logits against targets: top-1, top-5 and loss. Every stage may import this; it imports no soup module."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scores(logits: torch.Tensor, targets) -> dict:
    targets = torch.as_tensor(targets)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "top1": (top[:, 0] == targets).float().mean().item(),
        "top5": (top == targets[:, None]).any(dim=1).float().mean().item(),
        "loss": F.cross_entropy(logits, targets).item(),
        "n": len(targets),
    }
