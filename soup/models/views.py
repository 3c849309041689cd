"""Test-time augmentation (`--tta`): the views of an image that `soup eval` and `soup submit` average
logits over. A view is a function of the normalised (N, 3, S, S) batch, applied after the transform on
every path (plain loader, decoded store, prefix cache): normalisation is per pixel and per channel, so a
view of the normalised image equals the normalised view of the image, and both paths compute it from the
same tensor with the same ops, so their figures stay equal bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soup.errors import SoupError

CROP_SHARE = 0.875  # side of each crop, as a share of the image's side
# Crop name -> where its top-left corner sits, as a share of the room left (side - crop side).
CORNERS = {"crop top-left": (0, 0), "crop top-right": (0, 2), "crop bottom-left": (2, 0),
           "crop bottom-right": (2, 2), "crop centre": (1, 1)}
CROPS = tuple(CORNERS)
# --tta value -> views, the image itself first.
CHOICES = {"flip": ("image", "flip"), "flip,crops": ("image", "flip", *CROPS)}


def parse_tta(text: str | None) -> str | None:
    """The --tta value checked (None: no TTA)."""
    if text is None:
        return None
    if text not in CHOICES:
        raise SoupError(f"--tta {text}: use one of {', '.join(CHOICES)}")
    return text


def views_of(tta: str) -> tuple[str, ...]:
    return CHOICES[tta]


def _crop(images: torch.Tensor, view: str) -> torch.Tensor:
    # Resized back to the model's input size with bilinear antialiased interpolation, as Resize does on a tensor.
    size = images.shape[-1]
    side = int(size * CROP_SHARE)
    top, left = ((size - side) * share // 2 for share in CORNERS[view])
    crop = images[..., top:top + side, left:left + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def is_identity(view: str | None) -> bool:
    """Whether `view` is the image as it is: no view at all, or the "image" view every --tta choice starts with."""
    return view is None or view == "image"


def apply_view(view: str | None, images: torch.Tensor) -> torch.Tensor:
    """`images` (normalised, N x 3 x S x S) as `view` sees them."""
    if is_identity(view):
        return images
    if view == "flip":
        return torch.flip(images, dims=[-1])  # equals mirroring the PIL image before ToTensor
    if view in CORNERS:
        return _crop(images, view)
    raise ValueError(view)
