"""Writing an import whole or not at all: every file goes to a hidden temporary file beside its name first
(no command takes `.name.tmp` for a checkpoint), and only once all are written is each renamed into place;
a failure on any (a full disk) removes them all, with the ingredient folders made for them. A name that is
a symbolic link is refused, never written through. The start file is reused where it already holds the very
same tensors, and never replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from soup.errors import SoupError
from soup.models.files import atomic_path


def refuse_link(path: Path) -> None:
    """One line for an output name that is a symbolic link (a write there would change the file it names,
    or replace the link with no word), or lies in a linked folder the import makes for itself."""
    for place in (path, path.parent):
        if place.is_symlink():
            raise SoupError(f"{place} is a symbolic link; soup never writes through a link at an output name: "
                            "remove it, or import under another -o or --name")


def _same_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    try:
        held = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return False
    return held.keys() == tensors.keys() and all(
        held[k].dtype == v.dtype and torch.equal(held[k], v) for k, v in tensors.items())


def start_file_there(path: Path, tensors: dict[str, torch.Tensor], given: str) -> bool:
    """Whether `path` already holds exactly `tensors` (the start, stored by an earlier import: reuse it).
    False when there is no such file; a link, or a file with other tensors, is refused in one line: earlier
    ingredients name it as their start, so replacing it would change their start under them."""
    refuse_link(path)
    if not path.exists():
        return False
    if path.is_file() and _same_tensors(path, tensors):
        return True
    raise SoupError(f"{path} exists already and does not hold the backbone of --start {given}; ingredients "
                    "imported before start from it, so it is never replaced: import under another --name or -o, "
                    "or remove it if nothing uses it")


def write_all(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write each (path, writer) pair: `writer` fills the temporary path it is given; all are renamed into
    place only when every writer has finished, else none is (see the module's docstring)."""
    made = []
    for path, _ in files:
        refuse_link(path)
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        made += [p for p in reversed(missing) if p not in made]
    try:
        with contextlib.ExitStack() as stack:
            for path, write in files:
                write(stack.enter_context(atomic_path(path)))
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: what another process put there stays
        raise
