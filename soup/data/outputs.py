"""Where a command may write its result: never over one of its inputs, an ingredient, a weights file or an
image, never into an ingredient's folder (`soup train` owns it) or a data root's image folders, and over an
existing file only when the user says so (--overwrite). Checked before any work, so that a refusal wastes
nothing."""

from __future__ import annotations

import contextlib
from pathlib import Path

from soup.data.folders import IMAGE_SUFFIXES, SPLIT_FOLDERS, TEST_FOLDER
from soup.errors import SoupError
from soup.models.checkpoint import (INGREDIENT_FILE, LOCK_FILE, STATE_FILE, Checkpoint, is_soup_checkpoint,
                                   read_checkpoint)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PICTURE_SUFFIX = ".png"  # what soup plot writes, and so may redraw


def _in_ingredient_folder(path: Path) -> bool:
    """Whether `path` lies in an ingredient's folder: one holding its checkpoint, training state or lock."""
    return any((path.parent / name).is_file() for name in (INGREDIENT_FILE, STATE_FILE, LOCK_FILE))


def data_roots(checkpoints: list[Checkpoint], given: str | Path | None = None) -> list[Path]:
    """The data roots a command on `checkpoints` reads: --data when given, else each one's recipe data.root."""
    if given is not None:
        return [Path(given)]
    roots = [c.recipe.get("data") for c in checkpoints]
    roots = [data.get("root") for data in roots if isinstance(data, dict)]
    return [Path(root) for root in dict.fromkeys(roots) if isinstance(root, str) and root]


def _image_folders(root: Path) -> list[Path]:
    """The folders of `root` that soup reads images from, resolved: a class folder may be a link elsewhere."""
    folders = [root / "test_images", root / TEST_FOLDER]
    for split in dict.fromkeys(SPLIT_FOLDERS.values()):
        folders.append(root / split)
        with contextlib.suppress(OSError):
            folders += [p for p in (root / split).iterdir() if p.is_dir()]
    return [folder.resolve() for folder in folders]


def _check_data_roots(path: Path, exists: bool, roots: list[str | Path], what: str, elsewhere: str) -> None:
    # Both the name itself (its folder resolved) and what a link there leads to: replacing either is a loss.
    places = {path.parent.resolve() / path.name, path.resolve()}
    for root in roots:
        for folder in _image_folders(Path(root)):
            if any(place.is_relative_to(folder) for place in places):
                raise SoupError(f"{path} lies in {folder}, where the data root {root} keeps the images soup "
                                f"reads; {elsewhere}")
        if exists and any(place.is_relative_to(Path(root).resolve()) for place in places):
            raise SoupError(f"{path} is a file of the data root {root}, which a {what} never replaces, even with "
                            f"--overwrite; {elsewhere}")


def check_output(path: str | Path, inputs: list[str | Path], overwrite: bool, what: str,
                 checkpoint: bool = False, roots: list[str | Path] = ()) -> None:
    """Refuse, in one line, to write `what` (a soup, a submission, a picture) at `path`. `checkpoint`: the
    output itself is a checkpoint, so it may bear a weights suffix, but it still never replaces an
    ingredient. `roots`: the data roots the command reads (see `data_roots`), kept whole."""
    path = Path(path)
    target = path.resolve()
    elsewhere = f"write the {what} elsewhere with -o"
    if any(Path(given).resolve() == target for given in inputs):
        raise SoupError(f"{path} is one of this command's inputs; {elsewhere}")
    if _in_ingredient_folder(target):
        raise SoupError(f"{path} lies in the ingredient folder {target.parent}, which `soup train` owns; "
                        f"{elsewhere}")
    exists = path.exists() or path.is_symlink()
    _check_data_roots(path, exists, roots, what, elsewhere)
    suffixes = {path.suffix.lower(), target.suffix.lower()}
    picture = what == "picture"  # soup plot's PNG: redrawn over its own .png, never over another image
    if suffixes & IMAGE_SUFFIXES and not picture:
        raise SoupError(f"{path} is an image path, which a {what} never takes; {elsewhere}")
    if suffixes & IMAGE_SUFFIXES and exists and suffixes != {PICTURE_SUFFIX}:
        raise SoupError(f"{path} is an image, which a {what} never replaces; {elsewhere}")
    soup_file = exists and path.is_file() and is_soup_checkpoint(path)
    if not checkpoint and (target.suffix in WEIGHT_SUFFIXES or soup_file):
        raise SoupError(f"{path} is a checkpoint or weights path, which a {what} never replaces; {elsewhere}")
    if soup_file and read_checkpoint(path).kind == "ingredient":
        raise SoupError(f"{path} is an ingredient checkpoint, which a {what} never replaces; {elsewhere}")
    if exists and not overwrite:
        raise SoupError(f"{path} exists; add --overwrite to replace it, or {elsewhere}")
