"""Data: the course's folder layout read through torchvision, the held-out slice, and the test images.

Layout under a data root:
    train_images/<class>/*.jpg     val_images/<class>/*.jpg     test_images/mistery_category/*.jpg
The class list is the sorted folder names of train_images/, stored in every checkpoint.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from soup.data.augment import CROP_SCALE, POLICIES
from soup.errors import SoupError
from soup.recipe.spec import DataConfig

SPLIT_FOLDERS = {"train": "train_images", "val": "val_images", "holdout": "train_images"}
TEST_FOLDER = Path("test_images") / "mistery_category"
# Every suffix an image may have: what torchvision's folders list, and whatever else PIL opens; soup.data.outputs
# keeps a CSV or a soup from bearing one, and any output from replacing such a file.
IMAGE_SUFFIXES = frozenset(IMG_EXTENSIONS) | {ext for ext, kind in Image.registered_extensions().items()
                                             if kind in Image.OPEN}
LAYOUT_HINT = "expected <root>/train_images/<class>/*.jpg, <root>/val_images/<class>/*.jpg"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def load_rgb(path: str) -> Image.Image:
    """Read any image as RGB; transparent parts become white paper, not black."""
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; a bomb must stop the run, not stall it.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            image.load()
            if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
                # 16-bit grey: convert("RGB") clips every value above 255 to white; keep the top 8 bits.
                image = Image.fromarray((np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            if image.mode in ("RGBA", "LA", "PA"):
                paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(paper, image.convert("RGBA")).convert("RGB")
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SoupError(f"{path}: image too large to decode safely ({err}); resize or remove it") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise SoupError(
            f"{path}: not a readable image ({err}); remove it, or set data.skip_bad_images: true"
        ) from None


def build_transform(cfg: DataConfig, train: bool = False) -> transforms.Compose:
    size = cfg.image_size
    steps = [transforms.Resize((size, size), antialias=True)]
    if train and cfg.augment == "crop_hflip":
        steps = [transforms.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True)]
    if train and cfg.augment != "none":  # soup.data.augment lists what each one does
        steps.append(transforms.RandomHorizontalFlip())
    if train and cfg.augment in POLICIES:
        steps.append(POLICIES[cfg.augment]())
    steps += [transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)]
    return transforms.Compose(steps)


def find_classes(folder: Path) -> list[str]:
    """Sorted class folder names, with a clear error for a missing folder or an empty class."""
    if not folder.is_dir():
        raise SoupError(f"{folder}: no such folder; {LAYOUT_HINT}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SoupError(f"{folder}: holds no class folders; {LAYOUT_HINT}")
    for name in classes:
        if not any(is_image_file(p) for p in (folder / name).iterdir() if p.is_file()):
            raise SoupError(f"{folder / name}: class folder holds no images; {LAYOUT_HINT}")
    return classes


def _folder_id(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)  # follows symlinks: the folder a link leads to
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def list_images(directory: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, class index) of every image under each class folder, in torchvision's ImageFolder order.

    Symlinked folders are followed, except into a folder already read or one above a class folder (a
    loop, a class folder, a second link to the same place): ImageFolder follows those too, so one loop
    repeats a class ~40x under a wrong label and two hang the run."""
    seen = {_folder_id(directory)}
    for name in class_to_idx:
        path = Path(directory, name).resolve()
        seen.update(_folder_id(str(p)) for p in (path, *path.parents))
    samples = []
    for name in sorted(class_to_idx):
        found = []
        for root, dirs, files in os.walk(os.path.join(directory, name), followlinks=True):
            kept = []
            for sub in sorted(dirs):  # sorted: which of two links to one folder is read never varies
                folder = _folder_id(os.path.join(root, sub))
                if folder is not None and folder not in seen:
                    seen.add(folder)
                    kept.append(sub)
            dirs[:] = kept
            found.append((root, files))
        samples += [(os.path.join(root, file), class_to_idx[name])
                    for root, files in sorted(found, key=lambda item: item[0]) for file in sorted(files)
                    if has_file_allowed_extension(file, IMG_EXTENSIONS)]
    return samples


def _unreadable(path: str) -> bool:
    try:
        load_rgb(path)
        return False
    except SoupError:
        return True


class SketchFolder(ImageFolder):
    """ImageFolder that reads every image as RGB and names the file when one cannot be read.

    With `skip_bad=True` every image is decoded once up front and unreadable ones are dropped (listed in
    `skipped`), so that batches, data order and resume stay exactly reproducible."""

    def __init__(self, folder: Path, transform, classes: list[str], skip_bad: bool = False):
        self._expected = classes
        super().__init__(str(folder), transform=transform, loader=load_rgb)
        self.skipped: list[str] = []
        if skip_bad:
            with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
                bad = list(pool.map(_unreadable, (path for path, _ in self.samples)))
            self.skipped = [path for (path, _), is_bad in zip(self.samples, bad) if is_bad]
            self.samples = [sample for sample, is_bad in zip(self.samples, bad) if not is_bad]
            self.imgs = self.samples
            self.targets = [target for _, target in self.samples]

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return list_images(str(directory), class_to_idx)

    def find_classes(self, directory):
        classes = find_classes(Path(directory))
        if classes != self._expected and sorted(self._expected) == classes:
            # Folders are read sorted, and so was every class list soup wrote: an edited checkpoint's.
            raise SoupError(f"{directory}: class folders match the model's classes, but the model lists them in "
                            "another order; its checkpoint's metadata (classes) was edited")
        if classes != self._expected:
            missing = sorted(set(self._expected) - set(classes))
            extra = sorted(set(classes) - set(self._expected))
            raise SoupError(
                f"{directory}: class folders differ from train_images/ "
                f"(missing {missing[:3]}, extra {extra[:3]}); both splits need the same classes"
            )
        return classes, {name: i for i, name in enumerate(classes)}


def class_list(root: str | Path) -> list[str]:
    return find_classes(Path(root) / SPLIT_FOLDERS["train"])


def holdout_indices(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split of train into (kept, held out); the same for every ingredient of a sweep."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for target in sorted(by_class):
        indices = by_class[target]
        order = torch.randperm(len(indices), generator=generator).tolist()
        n_held = min(len(indices) - 1, math.ceil(fraction * len(indices))) if fraction > 0 else 0
        held += [indices[i] for i in order[:n_held]]
        kept += [indices[i] for i in order[n_held:]]
    return sorted(kept), sorted(held)


def load_split(cfg: DataConfig, split: str, root: str | Path | None = None, train: bool = False,
               classes: list[str] | None = None) -> Dataset:
    """The dataset of one split. `train=True` adds the recipe's augmentation (only for training)."""
    if split not in SPLIT_FOLDERS:
        raise SoupError(f"unknown split {split!r}; choose train, val or holdout")
    root = Path(root if root is not None else cfg.root)
    classes = classes if classes is not None else class_list(root)
    folder = SketchFolder(root / SPLIT_FOLDERS[split], build_transform(cfg, train=train), classes,
                          skip_bad=cfg.skip_bad_images)
    if split == "val":
        return folder
    if split == "holdout" and cfg.holdout <= 0:
        raise SoupError("split 'holdout' needs data.holdout > 0 in the recipe (e.g. data.holdout: 0.05)")
    kept, held = holdout_indices(folder.targets, cfg.holdout, cfg.holdout_seed)
    subset = Subset(folder, held if split == "holdout" else kept)
    subset.classes, subset.skipped = folder.classes, folder.skipped
    return subset


class TestImages(Dataset):
    """Every image in test_images/mistery_category/, sorted by name; items are (tensor, id)."""

    def __init__(self, root: str | Path, transform):
        folder = Path(root) / TEST_FOLDER
        if not folder.is_dir():
            raise SoupError(f"{folder}: no such folder; test images go in <root>/{TEST_FOLDER}/")
        self.paths = sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)),
                            key=lambda p: p.name)
        if not self.paths:
            raise SoupError(f"{folder}: holds no images")
        ids = [p.stem for p in self.paths]
        if len(set(ids)) != len(ids):
            raise SoupError(f"{folder}: two files share a name without extension; ids must be unique")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        return self.transform(load_rgb(str(path))), path.stem
