"""Where a command may write its result: never over one of its inputs, an ingredient or a weights file, never
into an ingredient's folder (`soup train` owns it), and over an existing file only when the user says so
(--overwrite). Checked before any work, so that a refusal wastes nothing."""

from __future__ import annotations

from pathlib import Path

from soup.checkpoint import INGREDIENT_FILE, is_soup_checkpoint, read_checkpoint
from soup.errors import SoupError
from soup.sweeps import LOCK_FILE, STATE_FILE

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _in_ingredient_folder(path: Path) -> bool:
    """Whether `path` lies in an ingredient's folder: one holding its checkpoint, training state or lock."""
    return any((path.parent / name).is_file() for name in (INGREDIENT_FILE, STATE_FILE, LOCK_FILE))


def check_output(path: str | Path, inputs: list[str | Path], overwrite: bool, what: str,
                 checkpoint: bool = False) -> None:
    """Refuse, in one line, to write `what` (a soup, a submission, ...) at `path`. `checkpoint`: the output
    itself is a checkpoint, so it may bear a weights suffix, but it still never replaces an ingredient."""
    path = Path(path)
    target = path.resolve()
    elsewhere = f"write the {what} elsewhere with -o"
    if any(Path(given).resolve() == target for given in inputs):
        raise SoupError(f"{path} is one of this command's inputs; {elsewhere}")
    if _in_ingredient_folder(target):
        raise SoupError(f"{path} lies in the ingredient folder {target.parent}, which `soup train` owns; "
                        f"{elsewhere}")
    exists = path.exists() or path.is_symlink()
    soup_file = exists and path.is_file() and is_soup_checkpoint(path)
    if not checkpoint and (target.suffix in WEIGHT_SUFFIXES or soup_file):
        raise SoupError(f"{path} is a checkpoint or weights path, which a {what} never replaces; {elsewhere}")
    if soup_file and read_checkpoint(path).kind == "ingredient":
        raise SoupError(f"{path} is an ingredient checkpoint, which a {what} never replaces; {elsewhere}")
    if exists and not overwrite:
        raise SoupError(f"{path} exists; add --overwrite to replace it, or {elsewhere}")
