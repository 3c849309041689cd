"""The prefix/suffix split and the prefix features: train only what is not frozen.

When the frozen part of a backbone is its stem (patch embedding) plus its first k units (blocks; for a
SwinV2 also its patch mergings), `PrefixSplit` cuts the backbone there, as its family
(soup.models.families) describes it: `prefix(images) -> tokens`, `suffix(tokens) -> features`.
`prefix_features` computes the prefix's output tokens for every image once per (prefix weights, k, image
store) and keeps them in fp32, the precision of the residual stream in the full forward (on the GPU when
they fit, else in pinned CPU memory, else in a memory-mapped store), so that a figure scored through them
is the full model's own. Training then runs only the suffix (`SuffixModel`) every epoch of every
ingredient of a sweep, and evaluation (also greedy soup selection) runs only the suffix.

The prefix runs in eval mode when cached, so it is used only when running it shows that train and eval
mode compute the same function (soup.fast.determinism: no dropout, drop-path, patch dropout or batch norm;
DinoV2 has none by default). Features are keyed by the prefix's weights, the model's spec and kwargs,
and its output on a fixed probe input, so two models that compute differently never share them.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from soup.errors import SoupError
from soup.fast.decoded import Normalizer, decoded_images, decoded_key, move
from soup.fast.determinism import mode, moves_state_in_train_mode, output_digest, probe_images, train_mode_difference
from soup.fast.store import (CACHE_VERSION, available_ram, cache_dir, create_store, fits_on_device, hash_of,
                             open_store, remember)
from soup.models.families import Family, family_of
from soup.models.inference import eval_dtype
from soup.models.views import apply_view, is_identity

# Where prefix features live: auto (device if it fits, else pinned/plain CPU memory, else a file), or
# forced to "device", "cpu" or "disk" (tests and benchmarks use this to exercise every placement).
FEATURE_STORE_ENV = "SOUP_FEATURE_STORE"


class PrefixSplit(nn.Module):
    """A backbone cut after unit k of its family (soup.models.families): `prefix(images) -> tokens` and
    `suffix(tokens) -> features`, equal in composition to the backbone's forward (checked numerically
    before use). A ViT's tokens are (N, T, D); a SwinV2's are NHWC maps (N, H, W, C)."""

    def __init__(self, backbone: nn.Module, family: Family, k: int):
        super().__init__()
        self.backbone, self.family, self.kind, self.k = backbone, family, family.name, k
        self.blocks = family.units(backbone)
        self.probe = ""  # determinism.output_digest on the probe images (find_prefix sets it)

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        x = self.family.stem(self.backbone, x)
        for block in self.blocks[:self.k]:
            x = block(x)
        return x

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[self.k:]:
            x = block(x)
        return self.family.head(self.backbone, x)

    def prefix_modules(self) -> list[nn.Module]:
        skip = (*self.family.post, self.family.container)
        pre = [m for name, m in self.backbone.named_children() if name not in skip]
        return pre + self.blocks[:self.k]

    def prefix_state(self) -> list[torch.Tensor]:
        """Every tensor the prefix computes with, in a fixed order (to fingerprint and compare)."""
        unused = self.family.unused
        tensors = [p for name, p in self.backbone.named_parameters(recurse=False) if name not in unused]
        tensors += [b for _, b in self.backbone.named_buffers(recurse=False)]
        for module in self.prefix_modules():
            tensors += list(module.parameters()) + list(module.buffers())
        return tensors

    def prefix_names(self) -> list[str]:
        """State-dict names (relative to the backbone) of `prefix_state`, same order."""
        unused = self.family.unused
        names = [n for n, _ in self.backbone.named_parameters(recurse=False) if n not in unused]
        names += [n for n, _ in self.backbone.named_buffers(recurse=False)]
        ids = {id(m): n for n, m in self.backbone.named_modules()}
        for module in self.prefix_modules():
            prefix = ids[id(module)]
            names += [f"{prefix}.{n}" for n, _ in module.named_parameters()]
            names += [f"{prefix}.{n}" for n, _ in module.named_buffers()]
        return names

    def cached_text(self) -> str:
        """What the prefix caches, as printed ("2 blocks")."""
        return self.family.cut_text(self.backbone, self.k)

    def rest_text(self) -> str:
        """What runs after it ("blocks 2-3 + head")."""
        return self.family.rest_text(self.backbone, self.k)


def find_prefix(backbone: nn.Module, size: int | None = None,
                eval_only: bool = False) -> tuple[PrefixSplit | None, str]:
    """The largest frozen unit prefix of a backbone family (from requires_grad flags) that computes the
    same in train and eval mode on `size`-px probe images (default: the patch embedding's size), or (None, why not).
    With `eval_only` (features for scoring only, never for training) train mode may compute differently
    (dropout, drop-path), as long as a train-mode forward leaves the prefix's state alone: the features
    then stay valid while the model trains.

    A partly frozen block k runs in the suffix with its frozen tensors: still exact, just less cached."""
    family = family_of(backbone)
    if family is None:
        return None, (f"{type(backbone).__name__} is not a ViT nor a SwinV2 (the backbone families soup can "
                      "cut: soup/models/families.py)")
    split = PrefixSplit(backbone, family, 0)
    pre = [p for p in split.prefix_state() if isinstance(p, nn.Parameter)]
    if any(p.requires_grad for p in pre):
        return None, "the patch embedding trains"
    k = 0
    for block in split.blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        k += 1
    if k == 0:
        return None, "no whole block is frozen"
    split.k = k
    images = probe_images(size or _embed_size(backbone), next(backbone.parameters()).device)
    if eval_only:
        if moves_state_in_train_mode(split.prefix, split.prefix_modules(), images):
            return None, "the frozen prefix moves its buffers in train mode (batch norm): cached features go stale"
    else:
        why = train_mode_difference(split.prefix, split.prefix_modules(), images)
        if why:
            return None, f"the frozen prefix {why}: features cached in eval mode would not train the same"
    split.probe = output_digest(split.prefix, split.prefix_modules(), images)
    return split, ""


def _embed_size(backbone: nn.Module) -> int:
    size = getattr(backbone.patch_embed, "img_size", None) or 224
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def prefix_fingerprint(split: PrefixSplit) -> str:
    digest = hashlib.sha256(f"{split.kind}:{split.k}".encode())
    for name, tensor in zip(split.prefix_names(), split.prefix_state()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# The tokens' storage: the residual stream between blocks is fp32 in the full forward, autocast or not
# (autocast rounds inside a block, never the sum it adds to), so anything narrower would make a cached
# figure differ from a plain evaluation of the same weights.
TOKEN_DTYPE = torch.float32


def split_matches(split: PrefixSplit, images: torch.Tensor) -> bool:
    """suffix(prefix(x)) == backbone(x) in fp32: guards against a variant whose forward does more
    than the split knows (then the cache is not used)."""
    with torch.no_grad(), mode([split.backbone], False), torch.autocast(images.device.type, enabled=False):
        full = split.backbone(images)
        parts = split.suffix(split.prefix(images))
    return (torch.is_tensor(full) and full.shape == parts.shape
            and torch.allclose(full.float(), parts.float(), rtol=1e-4, atol=1e-5))


# ----------------------------------------------------------------------------------- prefix features

@dataclass
class PrefixFeatures:
    """Prefix output tokens (N, T, D, fp32) of every image of one folder, in the folder's sample order."""

    tokens: torch.Tensor
    targets: torch.Tensor  # int64, CPU
    key: str
    where: str  # cuda | pinned cpu | cpu | memory map
    built: bool
    lookup: torch.Tensor | None = None  # folder index -> row of `tokens` when only some images are held

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of `tokens` holding these folder indices."""
        return rows if self.lookup is None else self.lookup[rows]


# key -> features for one prefix (weights, k, model, device) at a time: a new one frees the old ones.
_FEATURES: OrderedDict[str, PrefixFeatures] = OrderedDict()
_FEATURES_FAMILY: list = [None]


def _placement(nbytes: int, device: torch.device) -> str:
    forced = os.environ.get(FEATURE_STORE_ENV, "auto")
    if forced not in ("auto", "device", "cpu", "disk"):
        raise SoupError(f"{FEATURE_STORE_ENV}={forced!r}: use auto, device, cpu or disk")
    if forced == "device" or (forced == "auto" and fits_on_device(nbytes, device, share=0.5)):
        return "device" if device.type == "cuda" else "cpu"
    if forced == "disk" or (forced == "auto" and nbytes > 0.5 * available_ram()):
        return "disk"
    return "cpu"


def feature_config(backbone: str, kwargs: dict) -> dict:
    """The model configuration that is part of a feature store's key (prefix_features' `config`)."""
    return {"backbone": backbone, "kwargs": kwargs}


def prefix_features(split: PrefixSplit, folder: Dataset, transform: tuple, device: torch.device,
                    batch_size: int, num_workers: int = 0, dkey: str | None = None,
                    rows: list[int] | None = None, config: dict | None = None,
                    view: str | None = None) -> PrefixFeatures | None:
    """The prefix's tokens for every image of `folder` (or only its `rows`, e.g. a small holdout slice
    of train, unless the whole folder's are at hand), computed once per (prefix weights, k, model
    `config` (backbone spec and kwargs), probe output, decoded store); None when the split does not
    reproduce the backbone (then nothing is cached). With `view`, of that test-time view of each image
    (soup.models.views: the mirror or a crop of the normalised image, so --tta scores from tokens too)."""
    size, mean, std = transform
    dkey = dkey or decoded_key(folder, size)
    fp = prefix_fingerprint(split)
    dtype = eval_dtype(device)  # the plain evaluation's autocast, so the prefix computes as it does
    probe = split.probe or output_digest(split.prefix, split.prefix_modules(), probe_images(size, device))
    family = {"prefix": fp, "probe": probe, "model": config or {}, "kind": split.kind, "k": split.k}
    base = {"version": CACHE_VERSION, **family, "size": size, "mean": mean, "std": std, "decoded": dkey,
            "dtype": str(dtype), "tokens": str(TOKEN_DTYPE)}
    if not is_identity(view):  # only then: the image's own tokens keep the key they always had
        base["view"] = view
    whole = hash_of(base)
    if rows is not None and sorted(set(rows)) == list(range(len(folder.samples))):
        rows = None
    key = whole if rows is None else hash_of({**base, "rows": hash_of(list(rows))})
    for known in (whole, key):
        if known in _FEATURES:
            cached = _FEATURES[known]
            return PrefixFeatures(cached.tokens, cached.targets, known, cached.where, False, cached.lookup)
    if _FEATURES_FAMILY[0] != (hash_of(family), str(device)):
        _FEATURES.clear()
        _FEATURES_FAMILY[0] = (hash_of(family), str(device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    images = decoded_images(folder, size, num_workers, dkey)
    normalize = Normalizer(mean, std, device)
    source, targets, lookup = images.images, images.targets, None
    if rows is not None:
        chosen = torch.as_tensor(rows, dtype=torch.long)
        source, targets = source.index_select(0, chosen.to(source.device)), targets[chosen]
        lookup = torch.full((len(images.images),), -1, dtype=torch.long)
        lookup[chosen] = torch.arange(len(chosen))
    n = len(source)
    if not split_matches(split, normalize(source[:2])):
        return None

    def run(start: int) -> torch.Tensor:
        x = apply_view(view, normalize(source[start:start + batch_size]))
        with (torch.no_grad(), mode(split.prefix_modules(), False),
              torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)):
            return split.prefix(x).to(TOKEN_DTYPE)

    tokens, label, built = _all_tokens(run, n, batch_size, device, key, folder)
    features = PrefixFeatures(tokens, targets, key, label, built, lookup)
    return remember(_FEATURES, key, features)


def _all_tokens(run, n: int, batch_size: int, device: torch.device, key: str,
                folder: Dataset) -> tuple[torch.Tensor, str, bool]:
    """(tokens of all n images, where they live, whether computed now): `run(start)` gives one batch."""
    first = run(0)
    shape = (n, *first.shape[1:])
    where = _placement(math.prod(shape) * first.element_size(), device)
    if where == "disk":
        # Named by what it holds: another model's or study's store of this split stays (the folder's
        # budget, soup.fast.store.evict, is what removes stores).
        path = cache_dir(Path(folder.root).parent) / f"prefix-{Path(folder.root).name}-{key[:16]}.bin"
        array, built = open_store(path, key), False
        if array is None or array.shape != shape:
            def fill(out: np.ndarray) -> None:
                out[:len(first)] = first.cpu().numpy()
                for start in range(len(first), n, batch_size):
                    out[start:start + batch_size] = run(start).cpu().numpy()

            array, built = create_store(path, key, shape, np.float32, fill), True
        return torch.from_numpy(array), "memory map", built
    if where == "device":
        tokens, label = torch.empty(shape, dtype=TOKEN_DTYPE, device=device), str(device)
    else:
        pin = device.type == "cuda"
        tokens = torch.empty(shape, dtype=TOKEN_DTYPE, pin_memory=pin)
        label = "pinned cpu" if pin else "cpu"
    tokens[:len(first)] = first
    for start in range(len(first), n, batch_size):
        tokens[start:start + batch_size] = run(start)
    return tokens, label, True


class SuffixModel(nn.Module):
    """tokens -> logits through the trainable part only; shares its modules with the full model."""

    def __init__(self, model: nn.Module, split: PrefixSplit):
        super().__init__()
        self.split, self.head = split, model.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.split.suffix(tokens))


def to_device(device: torch.device):
    """Stored tokens -> the suffix's input on `device`; they are stored as the fp32 residual stream the full
    forward carries, so moving them is all it takes."""
    return lambda tokens: move(tokens, device)

