"""Augmentation on the device: uint8 image batches in, uint8 batches out; mixup/cutmix and their loss.

What each `data.augment` does (training only; the PIL path, `soup.data.folders.build_transform`, does the same
per image, so the two are equal in distribution, not bit for bit):
  none            nothing
  hflip           horizontal flip with probability 0.5
  crop_hflip      RandomResizedCrop to image_size (area scale CROP_SCALE, ratio 3/4 to 4/3) + hflip
  randaugment     hflip + torchvision RandAugment (2 ops, magnitude 9)
  trivialaugment  hflip + torchvision TrivialAugmentWide
  autoaugment     hflip + torchvision AutoAugment (ImageNet policy)

Interface:
- `store_size(augment, image_size)`: the side the decoded-image store needs: image_size, or for
  crop_hflip image_size / sqrt(min crop scale) rounded up, so that a square crop of the smallest area
  still spans image_size stored pixels (crops shrink; they are not blown up from a smaller store).
- `DeviceAugment(augment, image_size)(images, generator)`: uint8 (N, 3, S, S) on any device, S =
  store_size(...) -> uint8 (N, 3, image_size, image_size) on the same device (a new tensor; the input
  itself for none: it is never modified). Normalise after it (soup.fast.decoded.Normalizer). Every random
  draw comes from `generator`.
- `augment_generator(seed, rank, epoch)`: that generator for one rank's epoch: a resumed run and every
  DDP rank get their own reproducible stream; `mix_generator(seed, rank, epoch)` the same for mixup/cutmix.
- `make_mixer(train, num_classes)` -> `Mixer` or None (mixup and cutmix both 0): `mixer(images, targets,
  generator)` mixes normalised float images and returns soft targets (rows sum to 1) with the label
  smoothing folded in; `classification_loss(logits, targets, label_smoothing)` takes either kind.

Per-sample randomness: torchvision v2 transforms draw their parameters once per call, so every image
draws its own here, with torchvision's own sampling, and the work is batched: the flip is one mask and
one `torch.where`; the crops are torchvision's RandomResizedCrop boxes resampled in one bilinear
`roi_align`; a policy's ops are drawn image by image, then each op is applied once to all the images
that drew it (RandAugment: at most 2 x 23 batched calls whatever the batch size). The draws use the
global CPU RNG, so each batch makes them inside `fork_rng` seeded from `generator`: reproducible, and
training's own RNG stream (dropout, ...) is left where it was. The policies' replay relies on
torchvision's `_apply_image_or_video_transform` (tests/data/test_augment.py checks it against the public
transforms, image by image).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2

from soup.recipe.spec import TrainConfig

CROP_SCALE = (0.8, 1.0)
POLICIES = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide, "autoaugment": v2.AutoAugment}
# Streams drawn from the same train.seed, kept apart: the augmentation's ("aug") and mixup/cutmix's ("mix").
_STREAM = 0x617567
_MIX_STREAM = 0x6D6978


def store_size(augment: str, image_size: int) -> int:
    if augment == "crop_hflip":
        return math.ceil(image_size / math.sqrt(CROP_SCALE[0]))
    return image_size


def _stream_generator(stream: int, seed: int, rank: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([stream, seed % 2**32, rank, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def augment_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    return _stream_generator(_STREAM, seed, rank, epoch)


def mix_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """The mixup/cutmix draws of one rank's epoch: reproducible on resume, apart across ranks."""
    return _stream_generator(_MIX_STREAM, seed, rank, epoch)


def _to(drawn: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small tensor drawn on the CPU, sent to the images' device without waiting for the device to finish
    its queued work (a blocking copy would hold the host at every batch)."""
    return drawn.to(device, non_blocking=True)


def _fork_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (), generator=generator))


class DeviceAugment:
    """The recipe's augmentation for batches of stored uint8 images (see the module comment)."""

    def __init__(self, augment: str, image_size: int):
        self.augment, self.image_size = augment, image_size
        self.store_size = store_size(augment, image_size)
        self.crop = (v2.RandomResizedCrop(image_size, scale=CROP_SCALE, antialias=True)
                     if augment == "crop_hflip" else None)
        self.policy = POLICIES[augment]() if augment in POLICIES else None
        self._sampler, self._drawn = None, []
        if self.policy is not None:
            # A twin of the policy that runs torchvision's own draws but records each op it would apply
            # instead of touching pixels (torchvision calls this method for every op it applies).
            self._sampler = POLICIES[augment]()
            self._sampler._apply_image_or_video_transform = self._record

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (
                3, self.store_size, self.store_size):
            raise ValueError(f"{self.augment}: expected uint8 (N, 3, {self.store_size}, {self.store_size}) images, "
                             f"got {images.dtype} {tuple(images.shape)}")
        if self.augment == "none":
            return images
        flips = _to(torch.rand(len(images), generator=generator) < 0.5, images.device)
        # Flip first: flips commute in distribution with crops and policies (crop offsets and policy
        # signs are symmetric), so this equals the PIL path's crop, flip, policy. A new tensor from here.
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        if self.crop is None and self.policy is None:
            return images
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_fork_seed(generator))
            if self.crop is not None:
                images = self._crops(images)
            if self.policy is not None:
                images = self._policies(images)
        return images

    def _crops(self, images: torch.Tensor) -> torch.Tensor:
        """torchvision's RandomResizedCrop box per image, all resampled in one bilinear `roi_align`
        (the per-image resize differs by at most one level of 255, rounding)."""
        boxes = []
        for row in range(len(images)):
            box = self.crop.make_params([images[row]])
            left, top = box["left"], box["top"]
            boxes.append([row, left, top, left + box["width"], top + box["height"]])
        rois = _to(torch.tensor(boxes, dtype=torch.float32), images.device)
        out = roi_align(images.float(), rois, output_size=self.image_size, spatial_scale=1.0, sampling_ratio=1,
                        aligned=True)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def _record(self, image, transform_id, magnitude, interpolation, fill):
        self._drawn.append((transform_id, magnitude))
        return image

    def _policies(self, images: torch.Tensor) -> torch.Tensor:
        """Each image draws its own ops (the policy's own sampling, per image); then every op is applied
        once to all the images that drew it at that position: at most a few dozen batched calls per batch
        instead of one call per op per image."""
        blank = torch.zeros((), dtype=torch.uint8).expand(images.shape[1:])  # shape only, no memory
        drawn = []
        for _ in range(len(images)):
            self._drawn = []
            self._sampler(blank)
            drawn.append(self._drawn)
        for slot in range(max(map(len, drawn))):
            groups: dict[tuple, list[int]] = {}
            for row, ops in enumerate(drawn):
                if slot < len(ops) and ops[slot][0] != "Identity":
                    groups.setdefault(ops[slot], []).append(row)
            for (op, magnitude), rows in groups.items():
                index = _to(torch.tensor(rows), images.device)
                images[index] = self.policy._apply_image_or_video_transform(
                    images[index], op, magnitude, interpolation=self.policy.interpolation, fill=self.policy._fill)
        return images


class Mixer:
    """torchvision's MixUp and/or CutMix (one of the two, evenly, per batch when both are on): one λ per
    batch, each image mixed with its neighbour in the batch. Targets come back as class probabilities
    with label smoothing ε folded in (y (1 - ε) + ε / classes, as timm's Mixup does), so the loss
    must not smooth them again."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int, label_smoothing: float = 0.0):
        mixers = [cls(alpha=alpha, num_classes=num_classes)
                  for cls, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha > 0]
        if not mixers:
            raise ValueError("Mixer needs mixup > 0 or cutmix > 0")
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images (N, 3, H, W) and class indices (N,) -> mixed images, soft targets."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_fork_seed(generator))
            images, soft = self.mix(images, targets)
        eps = self.label_smoothing
        return images, soft * (1.0 - eps) + eps / self.num_classes


def make_mixer(train: TrainConfig, num_classes: int) -> Mixer | None:
    if train.mixup <= 0 and train.cutmix <= 0:
        return None
    return Mixer(train.mixup, train.cutmix, num_classes, train.label_smoothing)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against class indices (smoothed here) or class probabilities (a Mixer's, whose
    smoothing is folded in already)."""
    if targets.is_floating_point():
        return F.cross_entropy(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
