"""What a frozen prefix does, found by running it: is it the same function in train and eval mode (then
features cached in eval mode train exactly), and a digest of its output on a fixed input (then two
models that compute differently never share cached features, whatever their weights)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator

import torch
from timm.layers import DropPath
from torch import nn

PROBE_SEED = 0
PROBE_BATCH = 2


@contextlib.contextmanager
def mode(modules: list[nn.Module], training: bool) -> Iterator[None]:
    """Train or eval mode for these modules only, restored afterwards."""
    saved = [(m, m.training) for top in modules for m in top.modules()]
    for module, _ in saved:
        module.training = training
    try:
        yield
    finally:
        for module, was in saved:
            module.training = was


@contextlib.contextmanager
def untouched(modules: list[nn.Module], device: torch.device) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Buffers (batch-norm statistics) and RNG states as they were before: a probe must change nothing
    that training later sees. Yields (buffer, its value before) pairs."""
    buffers = [b for top in modules for b in top.buffers()]
    saved = [b.detach().clone() for b in buffers]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield list(zip(buffers, saved))
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)


def probe_images(size: int, device: torch.device) -> torch.Tensor:
    """The fixed probe batch: normalised-image-like noise, the same in every process."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(PROBE_BATCH, 3, size, size, generator=generator).to(device)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bit for bit: drop-path behind a freshly initialised layer scale (1e-5) moves the tokens by 1e-7
    # only, yet it is there. The same fp32 kernels on the same input give the same bits in either mode.
    return a.shape == b.shape and torch.equal(a, b)


def random_layers(modules: list[nn.Module]) -> list[str]:
    """Type names of the dropout and drop-path layers among `modules` that draw in train mode: a probe of
    two images can miss a rare drop (a SwinV2's first blocks drop a path at 1-2%), their settings cannot."""
    found = []
    for module in (m for top in modules for m in top.modules()):
        rate = (module.p if isinstance(module, nn.modules.dropout._DropoutNd)
                else getattr(module, "drop_prob", 0.0) if isinstance(module, DropPath) else 0.0)
        if rate > 0:
            found.append(type(module).__name__)
    return found


def train_mode_difference(prefix: Callable[[torch.Tensor], torch.Tensor], modules: list[nn.Module],
                          images: torch.Tensor) -> str | None:
    """How `prefix` run twice in train mode differs from itself in eval mode on `images` (twice: a
    random module may happen to match once), or None when it computes the same function. A dropout or
    drop-path layer with a rate above 0 is random whatever the probe happened to draw."""
    if random_layers(modules):
        return "is random in train mode (dropout, drop-path or patch dropout)"
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False), untouched(modules, images.device):
        with mode(modules, False):
            reference = prefix(images)
        with mode(modules, True):
            runs = [prefix(images), prefix(images)]
    if all(_same(run, reference) for run in runs):
        return None
    if not _same(*runs):
        return "is random in train mode (dropout, drop-path or patch dropout)"
    return "computes differently in train mode than in eval mode (dropout, drop-path, patch dropout, batch norm)"


def moves_state_in_train_mode(prefix: Callable[[torch.Tensor], torch.Tensor], modules: list[nn.Module],
                              images: torch.Tensor) -> bool:
    """Whether a train-mode forward moves the prefix's buffers (batch-norm statistics): then its eval-mode
    output drifts while training runs, and eval-mode features computed before training go stale."""
    with (torch.no_grad(), torch.autocast(images.device.type, enabled=False),
          untouched(modules, images.device) as buffers, mode(modules, True)):
        prefix(images)
        return not all(_same(buffer, before) for buffer, before in buffers)


def output_digest(prefix: Callable[[torch.Tensor], torch.Tensor], modules: list[nn.Module],
                  images: torch.Tensor) -> str:
    """A digest of the prefix's eval-mode output on the probe batch, at bf16 precision (what the cache
    keeps): a forward-changing setting such as the activation changes it even with equal weights."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False), mode(modules, False):
        out = prefix(images).to(torch.bfloat16).cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(out.shape)};".encode())
    digest.update(out.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
