"""Where a command may write its result: never over one of its inputs, an ingredient, a weights file or an
image, never into an ingredient's folder (`soup train` owns it) or a data root's image folders, and over an
existing file only when the user says so (--overwrite). Checked before any work, so that a refusal wastes
nothing."""

from __future__ import annotations

import contextlib
from pathlib import Path

from soup.data.folders import IMAGE_SUFFIXES, SPLIT_FOLDERS, TEST_FOLDER
from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, is_soup_checkpoint, read_checkpoint
from soup.models.runs import INGREDIENT_FILE, LOCK_FILE, STATE_FILE

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PICTURE_SUFFIX = ".png"  # what soup plot writes, and so may redraw


def ingredient_folder_of(path: Path, near: int = 1) -> Path | None:
    """The ingredient folder `path` is or lies in, at any depth (`soup train` owns it whole): one holding a
    soup checkpoint as model.safetensors (an export's has no soup metadata), or its training state and
    lock. `path` and the `near` folders above it count with a lock or a state alone (a run before its
    first checkpoint); further up, a lone `.lock` or `state.pt` is too common a name to go by."""
    for depth, place in enumerate((path, *path.parents)):
        weights = place / INGREDIENT_FILE
        if weights.is_file() and is_soup_checkpoint(weights):
            return place
        markers = [(place / name).is_file() for name in (STATE_FILE, LOCK_FILE)]
        if all(markers) or (depth <= near and any(markers)):
            return place
    return None


def recorded_roots(checkpoint: Checkpoint) -> list[Path]:
    """Where the data root a checkpoint's recipe names lies, resolved. A relative data.root was read from
    the folder training ran in: training records that resolved path (data_root); a file from before that
    record had its checkpoints folder there by default, so each ancestor holding such a data root counts
    too. The current folder's reading counts as well: that is where eval and submit look for it."""
    root = checkpoint.recipe.get("data", {}).get("root")  # an object, and a text: checked at read
    if not root:
        return []
    places = [Path(root)]
    if checkpoint.record.data_root is not None:
        places.append(Path(checkpoint.record.data_root))
    if not Path(root).is_absolute():
        places += [folder / root for folder in checkpoint.path.resolve().parents
                   if (folder / root / SPLIT_FOLDERS["train"]).is_dir()]
    return [place.resolve() for place in places]


def data_roots(checkpoints: list[Checkpoint], given: str | Path | None = None) -> list[Path]:
    """The data roots, resolved, a command on `checkpoints` reads: --data when given, else each one's
    recipe data.root wherever training found it (see `recorded_roots`)."""
    if given is not None:
        return [Path(given).resolve()]
    return list(dict.fromkeys(root for c in checkpoints for root in recorded_roots(c)))


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
    owner = ingredient_folder_of(target.parent, near=0)
    if owner is not None:
        raise SoupError(f"{path} lies in the ingredient folder {owner}, which `soup train` owns; {elsewhere}")
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
