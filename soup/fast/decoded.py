"""Decoded images: every image of a folder decoded, converted to RGB and resized once into a uint8 store
(a memory-mapped file, see soup.fast.store), and the Normalizer that turns its batches into model input
on the device.

The bytes equal what the plain path's PIL resize produces, so with `data.augment: none` batches are
bit-identical to the plain path's. With random augmentation the store is made at
`soup.data.augment.store_size(...)` and batches are augmented on the device (soup.fast.build). The key
covers file names, sizes, mtimes and a hash of each file's first and last 64 KiB, image size, resize and
colour conversion, and the PIL and torchvision versions.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from soup.data.folders import load_rgb
from soup.fast.store import (CACHE_VERSION, cache_dir, create_store, edge_digests, fits_on_device, hash_of,
                             open_store, remember)


def unwrap(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """(the image folder below any Subsets, the folder indices the dataset's items map to)."""
    indices = None
    while isinstance(dataset, Subset):
        inner = list(dataset.indices)
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, list(range(len(dataset))) if indices is None else indices


def plain_transform(dataset: Dataset) -> tuple[int, list[float], list[float]] | None:
    """(size, mean, std) if the folder's transform is exactly Resize((s, s)) + ToTensor + Normalize (no
    randomness): the only transform whose result the decoded store reproduces bit for bit."""
    steps = getattr(getattr(dataset, "transform", None), "transforms", None)
    if not steps or len(steps) != 3:
        return None
    resize, to_tensor, normalize = steps
    if not (type(resize) is transforms.Resize and type(to_tensor) is transforms.ToTensor
            and type(normalize) is transforms.Normalize):
        return None
    size = resize.size
    if isinstance(size, int) or len(size) != 2 or size[0] != size[1] or resize.antialias is False:
        return None
    return int(size[0]), [float(m) for m in normalize.mean], [float(s) for s in normalize.std]


class _Decode(Dataset):
    def __init__(self, paths: list[str], resize):
        self.paths, self.resize = paths, resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = self.resize(load_rgb(self.paths[i]))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass
class DecodedImages:
    """uint8 (N, 3, S, S) images of one folder, in the folder's sample order, plus their targets."""

    images: torch.Tensor  # on the CPU (memory map) or on the device
    targets: torch.Tensor  # int64, CPU
    key: str
    path: Path
    built: bool  # decoded in this call (False: read back from the store)

    @property
    def nbytes(self) -> int:
        return self.images.numel()


# (key, device) -> store, most recent last (store.remember keeps a few).
_DECODED: OrderedDict[tuple[str, str], DecodedImages] = OrderedDict()


def _resize_of(folder: Dataset, size: int):
    """The folder's own Resize to `size` (same interpolation as the plain path), or the recipe default."""
    steps = getattr(getattr(folder, "transform", None), "transforms", None) or []
    # Only a resize to this size: a store sized for crops (soup.data.augment.store_size) is larger.
    own = [t for t in steps if type(t) is transforms.Resize and list(t.size) == [size, size]]
    return own[0] if own else transforms.Resize((size, size), antialias=True)


def decoded_key(folder: Dataset, size: int) -> str:
    root = Path(folder.root)
    files = []
    digests = edge_digests([path for path, _ in folder.samples])
    for (path, target), digest in zip(folder.samples, digests):
        stat = os.stat(path)
        files.append([os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns, digest, target])
    return hash_of({"version": CACHE_VERSION, "size": size, "mode": "RGB, alpha on white (soup.data.folders.load_rgb)",
                  "resize": repr(_resize_of(folder, size)), "pil": PIL.__version__,
                  "torchvision": torchvision.__version__,
                  "files": files})


def decoded_images(folder: Dataset, size: int, num_workers: int = 0, key: str | None = None,
                   build: bool = True) -> DecodedImages | None:
    """The folder's decoded store: read back when valid, otherwise (missing, stale, corrupt) rebuilt, or
    with `build` False, None (a caller that needs a few of its images decodes those: decoded_rows)."""
    key = key or decoded_key(folder, size)
    if (key, "cpu") in _DECODED:
        _DECODED.move_to_end((key, "cpu"))
        hit = _DECODED[(key, "cpu")]
        return DecodedImages(hit.images, hit.targets, hit.key, hit.path, False)
    directory = cache_dir(Path(folder.root).parent)
    path = directory / f"decoded-{Path(folder.root).name}-{size}-{key[:16]}.bin"
    array, built = open_store(path, key), False
    if array is None or array.shape[1:] != (3, size, size):
        if not build:
            return None
        paths = [p for p, _ in folder.samples]

        def fill(out: np.ndarray) -> None:
            start = 0
            for batch in _decoded_batches(folder, size, paths, num_workers):
                out[start:start + len(batch)] = batch.numpy()
                start += len(batch)

        # A store of this folder and size for another file list: the images changed, it is never read again.
        stale = f"decoded-{Path(folder.root).name}-{size}-*.bin"
        array, built = create_store(path, key, (len(paths), 3, size, size), np.uint8, fill, stale), True
    store = DecodedImages(torch.from_numpy(array), torch.tensor([t for _, t in folder.samples]), key, path, built)
    return remember(_DECODED, (key, "cpu"), store)


def _decoded_batches(folder: Dataset, size: int, paths: list[str], num_workers: int):
    workers = min(num_workers, os.cpu_count() or 1)
    loader = DataLoader(_Decode(paths, _resize_of(folder, size)), batch_size=64, num_workers=workers)
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws a seed: cold or warm, same run
        yield from loader


def decoded_rows(folder: Dataset, size: int, rows: list[int], num_workers: int = 0) -> torch.Tensor:
    """uint8 (len(rows), 3, S, S): the folder's items `rows` decoded now, in memory, the bytes its store
    would hold for them; for a few images of a folder whose store was never built."""
    paths = [folder.samples[i][0] for i in rows]
    batches = list(_decoded_batches(folder, size, paths, num_workers))
    return torch.cat(batches) if batches else torch.empty(0, 3, size, size, dtype=torch.uint8)


def decoded_on(store: DecodedImages, device: torch.device) -> DecodedImages:
    """The store on the GPU when it fits with room to train (normalising there saves the host the work),
    else the CPU store (batches are gathered, pinned and copied)."""
    if device.type != "cuda":
        return store
    if (store.key, str(device)) in _DECODED:
        return _DECODED[(store.key, str(device))]
    if not fits_on_device(store.nbytes, device, share=0.3):
        return store
    moved = DecodedImages(store.images.to(device), store.targets, store.key, store.path, store.built)
    return remember(_DECODED, (store.key, str(device)), moved)


class Normalizer:
    """uint8 batches -> normalised float images on the device; the same arithmetic as ToTensor +
    Normalize (x / 255, then - mean, / std, in fp32), so the plain and cached paths see equal inputs."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.device, self.channels_last = device, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = move(images, self.device).float().div_(255).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor bound for a GPU goes through pinned memory without blocking the
    host (the copy is ordered on the stream before the kernels that read it)."""
    # Compare types, not devices: cuda and cuda:0 are unequal torch.devices yet the same GPU.
    if tensor.device.type == device.type:
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def gather(store: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """store[rows], gathered where the store lives (rows are moved there if they are not)."""
    return store.index_select(0, rows if rows.device == store.device else rows.to(store.device))
