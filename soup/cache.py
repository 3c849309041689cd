"""Fast data paths: skip the work a soup study repeats, exactly.

Two caches, both used only where they change no result beyond bf16 rounding:

- `DecodedImages`: every image of a folder decoded, converted to RGB and resized once into a uint8 store
  (a memory-mapped file under `<data root>/.soup_cache/`, or `$SOUP_CACHE_DIR`). Normalisation happens on
  the device. The bytes equal what the plain path's PIL resize produces, so batches are bit-identical.
  Valid whenever the training transform is the plain resize (recipe `data.augment: none`).
- `PrefixFeatures`: when the frozen part of a ViT is its patch embedding plus the first k blocks, the
  output tokens of that prefix for every image, computed once per (prefix weights, k, image store) and
  kept in bf16 (on the GPU when they fit, else in pinned CPU memory, else in a memory-mapped file).
  Training then runs only the suffix (blocks k.. + norm + head) every epoch of every ingredient of a
  sweep, and evaluation (also greedy soup selection) runs only the suffix.

The prefix runs in eval mode when cached, so it is used only when running it shows that train and eval
mode compute the same function (no dropout, drop-path, patch dropout or batch norm; DinoV2 has none by
default). Features are keyed by the prefix's weights, the model's spec and kwargs, and its output on a
fixed probe input, so two models that compute differently never share them.

A stale or corrupt store is detected by its header (magic, key, shape, dtype), its size and a CRC of its
bytes, and rebuilt; the key covers file names, sizes, mtimes and a hash of each file's first and last
64 KiB, image size and colour conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL
import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from soup.cache_files import clean_stale_temps, edge_digests, unwritable, writer_lock
from soup.checkpoint import atomic_path
from soup.data import load_rgb
from soup.errors import SoupError
from soup.prefix_probe import mode, output_digest, probe_images, train_mode_difference

CACHE_VERSION = 1
MAGIC = b"SOUPCACHE1\n"
HEADER_BYTES = 4096
CACHE_DIR_ENV = "SOUP_CACHE_DIR"
# Where prefix features live: auto (device if it fits, else pinned/plain CPU memory, else a file), or
# forced to "device", "cpu" or "disk" (tests and benchmarks use this to exercise every placement).
FEATURE_STORE_ENV = "SOUP_FEATURE_STORE"
GB = 1e9


class CacheUnavailable(Exception):
    """The caches cannot be used here (no writable cache folder, data they do not cover): take the plain
    path, which is always valid."""


# --------------------------------------------------------------------------------------------- stores

def _crc(array: np.ndarray) -> int:
    flat = array.reshape(-1).view(np.uint8)
    crc, step = 0, 64 << 20
    for start in range(0, flat.size, step):
        crc = zlib.crc32(memoryview(flat[start:start + step]), crc)
    return crc


def _header(key: str, shape: tuple, dtype: np.dtype, crc: int) -> bytes:
    meta = json.dumps({"version": CACHE_VERSION, "key": key, "shape": list(shape), "dtype": np.dtype(dtype).str,
                       "crc": crc}).encode()
    if len(MAGIC) + len(meta) > HEADER_BYTES:  # pragma: no cover - keys are short hashes
        raise ValueError("cache header too long")
    return (MAGIC + meta).ljust(HEADER_BYTES, b"\0")


def open_store(path: Path, key: str) -> np.ndarray | None:
    """The store at `path` if it is complete, uncorrupted and made for `key`; None otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if not head.startswith(MAGIC):
            return None
        meta = json.loads(head[len(MAGIC):].rstrip(b"\0"))
        dtype, shape = np.dtype(meta["dtype"]), tuple(meta["shape"])
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            return None
        if size != HEADER_BYTES + math.prod(shape) * dtype.itemsize:
            return None
        # Copy-on-write: a writable array without touching the file (torch warns on read-only numpy).
        array = np.memmap(path, dtype=dtype, mode="c", offset=HEADER_BYTES, shape=shape)
        if _crc(array) != meta["crc"]:
            return None
        return array
    except (OSError, ValueError, KeyError, TypeError):
        return None


def create_store(path: Path, key: str, shape: tuple, dtype, fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """Write a store atomically: `fill` writes the array in place, then the header seals it."""
    dtype = np.dtype(dtype)
    # The writer's lock outlives the rename, so no later run takes this file for a killed one's leftover.
    with contextlib.ExitStack() as writing, atomic_path(path) as tmp:
        f = writing.enter_context(writer_lock(tmp))
        f.truncate(HEADER_BYTES + math.prod(shape) * dtype.itemsize)
        array = np.memmap(tmp, dtype=dtype, mode="r+", offset=HEADER_BYTES, shape=shape)
        fill(array)
        array.flush()
        crc = _crc(array)
        del array
        f.write(_header(key, shape, dtype, crc))
        f.flush()
    for stale in path.parent.glob(f"{path.name.rsplit('-', 1)[0]}-*.bin"):
        if stale != path:  # same folder and size, older file list: never read again
            stale.unlink(missing_ok=True)
    return np.memmap(path, dtype=dtype, mode="c", offset=HEADER_BYTES, shape=shape)


def cache_dir(root: Path) -> Path:
    """`$SOUP_CACHE_DIR`, else `<data root>/.soup_cache`, else (read-only data) `~/.cache/soup`: the first
    one writable, cleared of store temporaries a killed run left. An unwritable `$SOUP_CACHE_DIR` is
    one warning line, not a failed run."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    refused = unwritable(Path(chosen)) if chosen else None
    if chosen and refused is None:
        candidate = Path(chosen)
    else:
        candidate = next((c for c in (Path(root) / ".soup_cache", Path.home() / ".cache" / "soup")
                          if unwritable(c) is None), None)
    if refused and chosen not in _WARNED:
        _WARNED.add(chosen)
        instead = f"caching in {candidate} instead" if candidate else "no cache folder is writable: plain path"
        _warn(f"{CACHE_DIR_ENV}={chosen} is not writable ({refused}); {instead}")
    if candidate is None:
        raise CacheUnavailable(f"no writable cache folder under {root} or ~/.cache/soup")
    clean_stale_temps(candidate)
    return candidate


_WARNED: set[str] = set()  # one warning per folder and process, not one per store


def _warn(message: str) -> None:
    Console(stderr=True, highlight=False).print(f"[yellow]warning[/]: {message}", soft_wrap=True)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _human(nbytes: float) -> str:
    if nbytes >= 0.1 * GB:
        return f"{nbytes / GB:.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.0f} kB"


# ---------------------------------------------------------------------------------- decoded images

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


# (key, device) -> store, most recent last: a sweep opens each folder's store once (train, val, holdout),
# and a later data set evicts the oldest rather than pinning every store it ever saw.
_DECODED: OrderedDict[tuple[str, str], DecodedImages] = OrderedDict()
_KEEP = 4


def _remember(registry: OrderedDict, key, value):
    registry[key] = value
    registry.move_to_end(key)
    while len(registry) > _KEEP:
        registry.popitem(last=False)
    return value


def _resize_of(folder: Dataset, size: int):
    """The folder's own Resize (same interpolation as the plain path), or the recipe default."""
    steps = getattr(getattr(folder, "transform", None), "transforms", None) or []
    own = [t for t in steps if type(t) is transforms.Resize]
    return own[0] if own else transforms.Resize((size, size), antialias=True)


def decoded_key(folder: Dataset, size: int) -> str:
    root = Path(folder.root)
    files = []
    digests = edge_digests([path for path, _ in folder.samples])
    for (path, target), digest in zip(folder.samples, digests):
        stat = os.stat(path)
        files.append([os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns, digest, target])
    return _hash({"version": CACHE_VERSION, "size": size, "mode": "RGB, alpha on white (soup.data.load_rgb)",
                  "resize": repr(_resize_of(folder, size)), "pil": PIL.__version__,
                  "torchvision": torchvision.__version__,
                  "files": files})


def decoded_images(folder: Dataset, size: int, num_workers: int = 0, key: str | None = None) -> DecodedImages:
    """The folder's decoded store: read back when valid, otherwise (missing, stale, corrupt) rebuilt."""
    key = key or decoded_key(folder, size)
    if (key, "cpu") in _DECODED:
        _DECODED.move_to_end((key, "cpu"))
        hit = _DECODED[(key, "cpu")]
        return DecodedImages(hit.images, hit.targets, hit.key, hit.path, False)
    directory = cache_dir(Path(folder.root).parent)
    path = directory / f"decoded-{Path(folder.root).name}-{size}-{key[:16]}.bin"
    array, built = open_store(path, key), False
    if array is None or array.shape[1:] != (3, size, size):
        paths = [p for p, _ in folder.samples]

        def fill(out: np.ndarray) -> None:
            workers = min(num_workers, os.cpu_count() or 1)
            loader = DataLoader(_Decode(paths, _resize_of(folder, size)), batch_size=64, num_workers=workers)
            start = 0
            with torch.random.fork_rng(devices=[]):  # a DataLoader draws a seed: cold or warm, same run
                for batch in loader:
                    out[start:start + len(batch)] = batch.numpy()
                    start += len(batch)

        array, built = create_store(path, key, (len(paths), 3, size, size), np.uint8, fill), True
    store = DecodedImages(torch.from_numpy(array), torch.tensor([t for _, t in folder.samples]), key, path, built)
    return _remember(_DECODED, (key, "cpu"), store)


def decoded_on(store: DecodedImages, device: torch.device) -> DecodedImages:
    """The store on the GPU when it fits with room to train (normalising there saves the host the work),
    else the CPU store (batches are gathered, pinned and copied)."""
    if device.type != "cuda":
        return store
    if (store.key, str(device)) in _DECODED:
        return _DECODED[(store.key, str(device))]
    if not _fits_on_device(store.nbytes, device, share=0.3):
        return store
    moved = DecodedImages(store.images.to(device), store.targets, store.key, store.path, store.built)
    return _remember(_DECODED, (store.key, str(device)), moved)


class Normalizer:
    """uint8 batches -> normalised float images on the device; the same arithmetic as ToTensor +
    Normalize (x / 255, then - mean, / std, in fp32), so the plain and cached paths see equal inputs."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.device, self.channels_last = device, channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Compare types, not devices: cuda and cuda:0 are unequal torch.devices yet the same GPU.
        if images.device.type != self.device.type:
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = images.to(self.device, non_blocking=True)
        x = images.float().div_(255).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _gather(store: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return store.index_select(0, rows.to(store.device))


def _fits_on_device(nbytes: int, device: torch.device, share: float) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < share * free


# ---------------------------------------------------------------------------------- ViT prefix split

def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks in order; DinoV2's chunked layout (BlockChunk lists padded with Identity)
    flattened."""
    flat = []
    for block in backbone.blocks:
        if isinstance(block, nn.ModuleList):
            flat += [b for b in block if not isinstance(b, nn.Identity)]
        else:
            flat.append(block)
    return flat


class ViTSplit(nn.Module):
    """A ViT cut after block k: `prefix(images) -> tokens` and `suffix(tokens) -> features`, equal in
    composition to the backbone's forward (checked numerically before use)."""

    # Top-level parts after the blocks; everything else outside `blocks` runs before them.
    POST = {"timm": ("norm", "fc_norm", "head_drop", "head", "attn_pool"), "dinov2": ("norm", "head")}
    UNUSED = ("mask_token",)  # DinoV2's masked-token parameter: never used without masks

    def __init__(self, backbone: nn.Module, kind: str, k: int):
        super().__init__()
        self.backbone, self.kind, self.k = backbone, kind, k
        self.blocks = _blocks(backbone)
        self.probe = ""  # prefix_probe.output_digest on the probe images (find_prefix sets it)

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        if self.kind == "timm":
            x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))
        else:
            x = b.prepare_tokens_with_masks(x, None)
        for block in self.blocks[:self.k]:
            x = block(x)
        return x

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        for block in self.blocks[self.k:]:
            x = block(x)
        if self.kind == "timm":
            return b.forward_head(b.norm(x))
        return b.head(b.norm(x)[:, 0])

    def prefix_modules(self) -> list[nn.Module]:
        post = self.POST[self.kind]
        pre = [m for name, m in self.backbone.named_children() if name not in post and name != "blocks"]
        return pre + self.blocks[:self.k]

    def prefix_state(self) -> list[torch.Tensor]:
        """Every tensor the prefix computes with, in a fixed order (to fingerprint and compare)."""
        tensors = [p for name, p in self.backbone.named_parameters(recurse=False) if name not in self.UNUSED]
        tensors += [b for _, b in self.backbone.named_buffers(recurse=False)]
        for module in self.prefix_modules():
            tensors += list(module.parameters()) + list(module.buffers())
        return tensors

    def prefix_names(self) -> list[str]:
        """State-dict names (relative to the backbone) of `prefix_state`, same order."""
        names = [n for n, _ in self.backbone.named_parameters(recurse=False) if n not in self.UNUSED]
        names += [n for n, _ in self.backbone.named_buffers(recurse=False)]
        ids = {id(m): n for n, m in self.backbone.named_modules()}
        for module in self.prefix_modules():
            prefix = ids[id(module)]
            names += [f"{prefix}.{n}" for n, _ in module.named_parameters()]
            names += [f"{prefix}.{n}" for n, _ in module.named_buffers()]
        return names


def vit_kind(backbone: nn.Module) -> str | None:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        VisionTransformer = ()
    if isinstance(backbone, VisionTransformer) and isinstance(backbone.blocks, nn.Sequential):
        return "timm"
    if all(hasattr(backbone, a) for a in ("prepare_tokens_with_masks", "blocks", "norm", "head")):
        return "dinov2"
    return None


def find_prefix(backbone: nn.Module, size: int | None = None) -> tuple[ViTSplit | None, str]:
    """The largest frozen block prefix of a ViT (from requires_grad flags) that computes the same in train
    and eval mode on `size`-px probe images (default: the patch embedding's size), or (None, why not).

    A partly frozen block k runs in the suffix with its frozen tensors: still exact, just less cached."""
    kind = vit_kind(backbone)
    if kind is None:
        return None, f"{type(backbone).__name__} is not a ViT"
    split = ViTSplit(backbone, kind, 0)
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
    why = train_mode_difference(split.prefix, split.prefix_modules(), images)
    if why:
        return None, f"the frozen prefix {why}: features cached in eval mode would not train the same"
    split.probe = output_digest(split.prefix, split.prefix_modules(), images)
    return split, ""


def _embed_size(backbone: nn.Module) -> int:
    size = getattr(backbone.patch_embed, "img_size", None) or 224
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def prefix_fingerprint(split: ViTSplit) -> str:
    digest = hashlib.sha256(f"{split.kind}:{split.k}".encode())
    for name, tensor in zip(split.prefix_names(), split.prefix_state()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def prefix_dtype(device: torch.device) -> torch.dtype | None:
    """The prefix is computed once, so precision is cheap there: fp32 on the CPU; on a GPU what the
    evaluation path uses (bf16 where supported)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def split_matches(split: ViTSplit, images: torch.Tensor) -> bool:
    """suffix(prefix(x)) == backbone(x) in fp32: guards against a ViT variant whose forward does more
    than the split knows (then the cache is not used)."""
    with torch.no_grad(), mode([split.backbone], False), torch.autocast(images.device.type, enabled=False):
        full = split.backbone(images)
        parts = split.suffix(split.prefix(images))
    return (torch.is_tensor(full) and full.shape == parts.shape
            and torch.allclose(full.float(), parts.float(), rtol=1e-4, atol=1e-5))


# ----------------------------------------------------------------------------------- prefix features

@dataclass
class PrefixFeatures:
    """bf16 prefix output tokens (N, T, D) of every image of one folder, in the folder's sample order."""

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
    if forced == "device" or (forced == "auto" and _fits_on_device(nbytes, device, share=0.5)):
        return "device" if device.type == "cuda" else "cpu"
    if forced == "disk" or (forced == "auto" and nbytes > 0.5 * _available_ram()):
        return "disk"
    return "cpu"


def prefix_features(split: ViTSplit, folder: Dataset, transform: tuple, device: torch.device,
                    batch_size: int, num_workers: int = 0, dkey: str | None = None,
                    rows: list[int] | None = None, config: dict | None = None) -> PrefixFeatures | None:
    """The prefix's tokens for every image of `folder` (or only its `rows`, e.g. a small holdout slice
    of train, unless the whole folder's are at hand), computed once per (prefix weights, k, model
    `config` (backbone spec and kwargs), probe output, decoded store); None when the split does not
    reproduce the backbone (then nothing is cached)."""
    size, mean, std = transform
    dkey = dkey or decoded_key(folder, size)
    fp = prefix_fingerprint(split)
    dtype = prefix_dtype(device)
    probe = split.probe or output_digest(split.prefix, split.prefix_modules(), probe_images(size, device))
    family = {"prefix": fp, "probe": probe, "model": config or {}, "kind": split.kind, "k": split.k}
    base = {"version": CACHE_VERSION, **family, "size": size, "mean": mean, "std": std, "decoded": dkey,
            "dtype": str(dtype)}
    whole = _hash(base)
    if rows is not None and sorted(set(rows)) == list(range(len(folder.samples))):
        rows = None
    key = whole if rows is None else _hash({**base, "rows": _hash(list(rows))})
    for known in (whole, key):
        if known in _FEATURES:
            cached = _FEATURES[known]
            return PrefixFeatures(cached.tokens, cached.targets, known, cached.where, False, cached.lookup)
    if _FEATURES_FAMILY[0] != (_hash(family), str(device)):
        _FEATURES.clear()
        _FEATURES_FAMILY[0] = (_hash(family), str(device))
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
        x = normalize(source[start:start + batch_size])
        with (torch.no_grad(), mode(split.prefix_modules(), False),
              torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)):
            return split.prefix(x).to(torch.bfloat16)

    first = run(0)
    shape = (n, *first.shape[1:])
    nbytes = math.prod(shape) * 2
    where = _placement(nbytes, device)
    if where == "disk":
        path = cache_dir(Path(folder.root).parent) / f"prefix-{Path(folder.root).name}-{key[:16]}.bin"
        array, built = open_store(path, key), False
        if array is None or array.shape != shape:
            def fill(out: np.ndarray) -> None:
                out[:len(first)] = first.cpu().view(torch.int16).numpy()
                for start in range(len(first), n, batch_size):
                    out[start:start + batch_size] = run(start).cpu().view(torch.int16).numpy()

            array, built = create_store(path, key, shape, np.int16, fill), True
        tokens, label = torch.from_numpy(array).view(torch.bfloat16), "memory map"
    else:
        built = True
        if where == "device":
            tokens, label = torch.empty(shape, dtype=torch.bfloat16, device=device), str(device)
        else:
            pin = device.type == "cuda"
            tokens = torch.empty(shape, dtype=torch.bfloat16, pin_memory=pin)
            label = "pinned cpu" if pin else "cpu"
        tokens[:len(first)] = first
        for start in range(len(first), n, batch_size):
            tokens[start:start + batch_size] = run(start)
    features = PrefixFeatures(tokens, targets, key, label, built, lookup)
    return _remember(_FEATURES, key, features)


class SuffixModel(nn.Module):
    """tokens -> logits through the trainable part only; shares its modules with the full model."""

    def __init__(self, model: nn.Module, split: ViTSplit):
        super().__init__()
        self.split, self.head = split, model.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.split.suffix(tokens))


def _to_float(device: torch.device):
    def load(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.device.type != device.type:
            if device.type == "cuda":
                tokens = tokens.pin_memory()
            tokens = tokens.to(device, non_blocking=True)
        # fp32 residual stream, as in the full forward (patch embedding + fp32 position embedding)
        return tokens.float()
    return load


def _eval_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None  # as soup.evaluate.predict


def score_rows(model: nn.Module, store: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, load,
               device: torch.device, batch_size: int) -> dict:
    """soup.evaluate.evaluate over cached inputs: same batches' arithmetic, same scores."""
    from soup.metrics import scores

    return scores(logits_rows(model, store, rows, load, device, batch_size), targets[rows])


@torch.no_grad()
def logits_rows(model: nn.Module, store: torch.Tensor, rows: torch.Tensor, load, device: torch.device,
                batch_size: int) -> torch.Tensor:
    """fp32 logits on the CPU for `rows` of a cached store, in order (as soup.evaluate.predict)."""
    was_training = model.training
    model.eval()
    dtype, logits = _eval_dtype(device), []
    try:
        for start in range(0, len(rows), batch_size):
            x = load(_gather(store, rows[start:start + batch_size]))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits)


# ---------------------------------------------------------------------------------------- pipelines

def _batches(store: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, load, device: torch.device,
             seed: int, batch_size: int):
    """(train_batches, steps_per_epoch) drawing exactly what the plain path's EpochSampler draws:
    consecutive slices of this rank's share of epoch_order(n, seed, epoch)."""
    from soup import distributed
    from soup.pipeline import epoch_order

    w = distributed.world()

    def train_batches(epoch: int):
        order = distributed.rank_slice(epoch_order(len(rows), seed, epoch), w.rank, w.size)
        order = torch.as_tensor(order, dtype=torch.long)
        for start in range(0, len(order), batch_size):
            chosen = rows[order[start:start + batch_size]]
            yield load(_gather(store, chosen)), targets[chosen].to(device, non_blocking=True)
    return train_batches, math.ceil(distributed.rank_count(len(rows), w.size) / batch_size)


def fast_pipeline(recipe, model: nn.Module, train_set: Dataset, val_set: Dataset, device: torch.device):
    """The fastest exact pipeline for this recipe and model, or None (then the plain one runs): the
    prefix cache when the frozen part is a ViT block prefix, else the decoded-image cache; nothing when
    training has random augmentation."""
    try:
        return _fast_pipeline(recipe, model, train_set, val_set, device)
    except CacheUnavailable:
        return None


def _fast_pipeline(recipe, model: nn.Module, train_set: Dataset, val_set: Dataset, device: torch.device):
    from soup.pipeline import Pipeline

    t = recipe.train
    if recipe.data.augment != "none":
        return None
    (train_folder, train_idx), (val_folder, val_idx) = unwrap(train_set), unwrap(val_set)
    if not all(hasattr(f, "samples") and hasattr(f, "root") for f in (train_folder, val_folder)):
        return None
    transform = plain_transform(train_folder)
    if transform is None or plain_transform(val_folder) != transform:
        return None
    train_rows, val_rows = torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(val_idx, dtype=torch.long)
    eval_batch = t.batch_size * 2

    split, why = find_prefix(model.backbone, transform[0])
    if split is not None:
        config = {"backbone": recipe.model.backbone, "kwargs": recipe.model.kwargs}
        train_f = prefix_features(split, train_folder, transform, device, eval_batch, t.num_workers,
                                  config=config)
        val_f = (prefix_features(split, val_folder, transform, device, eval_batch, t.num_workers, config=config)
                 if train_f is not None else None)
        if train_f is not None and val_f is not None:
            suffix = SuffixModel(model, split)
            load = _to_float(device)
            fresh = "computed now" if train_f.built or val_f.built else "shared with an earlier run"
            where = train_f.where if train_f.where == val_f.where else f"{train_f.where}/{val_f.where}"
            batches, steps = _batches(train_f.tokens, train_f.targets, train_rows, load, device, t.seed,
                                      t.batch_size)
            return Pipeline(
                suffix, batches,
                lambda: score_rows(suffix, val_f.tokens, val_f.targets, val_rows, load, device, eval_batch), steps,
                f"prefix cache: {split.k} blocks, {_human(train_f.nbytes + val_f.nbytes)} on {where} ({fresh}); "
                f"training runs blocks {split.k}-{len(split.blocks) - 1} + head")
        why = "the prefix does not reproduce this backbone's forward"

    size, mean, std = transform
    train_d = decoded_on(decoded_images(train_folder, size, t.num_workers), device)
    val_d = decoded_on(decoded_images(val_folder, size, t.num_workers), device)
    convnet = device.type == "cuda" and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if convnet:  # cuDNN's fast convolutions want NHWC; checkpoints stay contiguous (fp32_state)
        model.to(memory_format=torch.channels_last)
    load = Normalizer(mean, std, device, channels_last=convnet)
    nbytes = train_d.nbytes + (val_d.nbytes if val_d.key != train_d.key else 0)
    where = str(train_d.images.device) if train_d.images.device.type == "cuda" else "memory map"
    batches, steps = _batches(train_d.images, train_d.targets, train_rows, load, device, t.seed, t.batch_size)
    return Pipeline(
        model, batches,
        lambda: score_rows(model, val_d.images, val_d.targets, val_rows, load, device, eval_batch), steps,
        f"decoded-image cache: {len(train_d.images) + len(val_d.images)} images at {size} px, {_human(nbytes)} "
        f"({where}); no prefix cache: {why}")


# ------------------------------------------------------------------------------ selection (cooking)

class CachedScorer:
    """Scores weights of one architecture on one split from the caches: through the prefix features
    when the weights' prefix equals the one they were computed with (ingredients of one start and
    freeze, and their averages), else a full forward over the decoded images."""

    def __init__(self, model: nn.Module, dataset: Dataset, freeze: float, device: torch.device,
                 batch_size: int, num_workers: int = 0, config: dict | None = None):
        from soup.backbones import freeze_prefix

        folder, idx = unwrap(dataset)
        transform = plain_transform(folder) if hasattr(folder, "samples") else None
        if transform is None:
            raise CacheUnavailable("not a plain image folder")
        self.model, self.device, self.batch_size = model, device, batch_size
        self.rows = torch.as_tensor(idx, dtype=torch.long)
        size, mean, std = transform
        dkey = decoded_key(folder, size)
        # Decoded images are needed only for a full forward (weights with another prefix): load on demand.
        self._decoded, self._decode = None, lambda: decoded_on(decoded_images(folder, size, num_workers, dkey),
                                                                device)
        self.normalize = Normalizer(mean, std, device)
        self.split, self.features, self.reference = None, None, []
        flags = [p.requires_grad for p in model.backbone.parameters()]
        freeze_prefix(model.backbone, freeze)  # the k the ingredients trained with
        try:
            split, why = find_prefix(model.backbone, size)
        finally:
            for p, flag in zip(model.backbone.parameters(), flags):
                p.requires_grad_(flag)
        if split is not None:
            features = prefix_features(split, folder, transform, device, batch_size, num_workers, dkey, idx,
                                       config)
            if features is not None:
                self.split, self.features = split, features
                self.suffix = SuffixModel(model, split)
                self.reference = [t.detach().clone() for t in split.prefix_state()]
        self.description = (f"prefix cache: {split.k} blocks" if self.features is not None
                            else "decoded-image cache")

    def prefix_unchanged(self) -> bool:
        # An average of equal tensors equals them up to float rounding (Σ θ/n), far below bf16 storage.
        return all(torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                   for a, b in zip(self.split.prefix_state(), self.reference))

    def __call__(self) -> dict:
        """Scores of the weights now loaded in the model."""
        from soup.metrics import scores

        return scores(*self.logits())

    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of the weights now loaded in the model, in the split's order."""
        if self.features is not None and self.prefix_unchanged():
            rows = self.features.positions(self.rows)
            return (logits_rows(self.suffix, self.features.tokens, rows, _to_float(self.device), self.device,
                                self.batch_size), self.features.targets[rows])
        if self._decoded is None:
            self._decoded = self._decode()
        return (logits_rows(self.model, self._decoded.images, self.rows, self.normalize, self.device,
                            self.batch_size), self._decoded.targets[self.rows])
