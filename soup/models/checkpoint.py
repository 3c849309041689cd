"""Checkpoints: fp32 weights in one safetensors file, with the soup metadata that later stages rely on.

Metadata (JSON under the "soup" key) holds the resolved recipe, backbone id, class list, a fingerprint of
the starting weights, and for soups the method and members. Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from soup.errors import SoupError
from soup.models.files import atomic_path, rewritable
from soup.models.records import Record, dumped, parse
METADATA_KEY = "soup"


def fp32_state(state_dict: dict) -> dict[str, torch.Tensor]:
    """Floating tensors as fp32 (AMP never leaks into a checkpoint); integer buffers untouched."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state_dict.items()}


def save_checkpoint(path: str | Path, state_dict: dict, meta: Record | dict, replace: bool = True) -> Path:
    """The one writer of checkpoints (train, cook, import): `meta` is dumped once, here. `replace=False`
    takes the name only while it is still free (two cooks racing to one new output: one wins)."""
    with atomic_path(path, replace) as tmp:
        save_file(fp32_state(state_dict), str(tmp), metadata={METADATA_KEY: json.dumps(dumped(meta))})
    return Path(path)


def rewrite_metadata(path: str | Path, meta: Record | dict) -> Path:
    """Replace a checkpoint's soup metadata, atomically, in the file `path` names (see `rewritable`). Its
    tensors are written back as read: a soup checkpoint holds fp32 and integer tensors only, which
    save_checkpoint keeps byte for byte."""
    target = rewritable(path)
    save_checkpoint(target, read_tensors(target), meta)
    return Path(path)


@dataclass
class Checkpoint:
    """A soup checkpoint file and its record (soup.models.records), parsed once. `meta` is the metadata
    object as written, for whoever looks at the raw JSON (tests, a rewrite); soup reads `record`. Read from
    a file, the record is checked (read_checkpoint); built in memory without one, it is parsed as given."""

    path: Path
    meta: dict
    record: Record = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self):
        if self.record is None:
            self.record = parse(self.path, self.meta, checked=False)

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def name(self) -> str:
        if self.kind == "ingredient":
            return f"{self.record.name or '?'}/{self.record.id or self.path.parent.name}"
        return self.path.stem

    @property
    def classes(self) -> list[str]:
        return self.record.classes

    @property
    def backbone(self) -> str:
        return self.record.backbone

    @property
    def fingerprint(self) -> str:
        return self.record.start.fingerprint

    @property
    def recipe(self) -> dict:
        return self.record.recipe

    def tensor_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        with _open(self.path) as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Its tensors, every floating one checked finite as it is read (see `finite`)."""
        return read_tensors(self.path)

    def check_finite(self) -> None:
        """Refuse the file if one of its tensors holds NaN or infinity; one tensor in memory at a time."""
        with _open(self.path) as f:
            for key in f.keys():
                finite(self.path, key, f.get_tensor(key))


def finite(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, unless it is a floating one holding NaN or infinity: every command that uses a
    checkpoint's weights refuses those (a soup of them is NaN, a submission from them all one class)."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise SoupError(f"{path}: tensor {key} holds NaN or infinite values; its training diverged or the file "
                        "was damaged: retrain it (e.g. a lower lr) or leave it out")
    return tensor


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at `path`, every floating one checked finite as it is read."""
    with _open(path) as f:
        return {k: finite(path, k, f.get_tensor(k)) for k in f.keys()}


@contextlib.contextmanager
def _open(path: Path):
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise SoupError(f"{path}: not a readable safetensors file ({err}); re-create or remove it") from None
    with handle as f:
        yield f


def tensors_across(checkpoints: list[Checkpoint]) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(name, that tensor of every checkpoint) for each tensor name of the first: one name in memory at a
    time, however many checkpoints."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(_open(c.path)) for c in checkpoints]
        for key in files[0].keys():
            yield key, [finite(c.path, key, f.get_tensor(key)) for c, f in zip(checkpoints, files)]


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"{path}: no such checkpoint file")
    return _checkpoint_from(path, *_soup_header(path))


HEAD_WEIGHT = "head.weight"  # soup.models.backbones.Classifier's head: one row per class


def _soup_header(path: Path) -> tuple[str | None, int | None]:
    """(the raw soup metadata of a safetensors file (None: a file soup did not write), the rows of its head
    tensor (None: it has none)); one header read."""
    with _open(path) as f:
        shape = f.get_slice(HEAD_WEIGHT).get_shape() if HEAD_WEIGHT in f.keys() else None
        return (f.metadata() or {}).get(METADATA_KEY), shape[0] if shape else None


def _checkpoint_from(path: Path, raw: str | None, head_rows: int | None = None) -> Checkpoint:
    """A Checkpoint from its raw metadata, checked (one line naming the file when it is not soup's)."""
    if raw is None:
        raise SoupError(f"{path}: a safetensors file without soup metadata; only files written by "
                        "`soup train` or `soup cook` can be souped (use model.weights to start from it)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise SoupError(f"{path}: soup metadata is not valid JSON; the file is damaged") from None
    if not isinstance(meta, dict):
        raise SoupError(f"{path}: soup metadata is not a JSON object; the file is damaged")
    return Checkpoint(path, meta, parse(path, meta, head_rows))


def is_soup_checkpoint(path: str | Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def _in_folder(folder: Path, warn: Callable[[str], None] | None) -> list[Checkpoint]:
    """The soup checkpoints below `folder`, sorted. Other safetensors files (weights kept there) are passed
    over; a damaged one is named through `warn` and skipped, or without `warn` stops with its error."""
    found = []
    for file in sorted(folder.rglob("*.safetensors")):
        if file.name.startswith("."):
            continue
        try:
            raw, head_rows = _soup_header(file)
            if raw is not None:  # other safetensors files (weights kept there) are not checkpoints
                found.append(_checkpoint_from(file, raw, head_rows))
        except SoupError as err:
            if warn is None:
                raise
            warn(f"skipped {err}")
    return found


def find_checkpoints(paths: list[str | Path], kinds: set[str] | None = None,
                     warn: Callable[[str], None] | None = None) -> list[Checkpoint]:
    """Checkpoints named, or found below named folders (sorted), optionally of some kinds only. A damaged
    file in a folder goes to `warn` (the search goes on) or, without it, stops the search."""
    found: list[Checkpoint] = []
    for given in paths:
        given = Path(given)
        if given.is_dir():
            # A probed start (soup.train.probe) beside the ingredients is their start, not one of them.
            found.extend(c for c in _in_folder(given, warn)
                         if (c.kind in kinds if kinds else c.kind != "probe"))
        elif given.exists():
            found.append(read_checkpoint(given))
        else:
            raise SoupError(f"{given}: no such checkpoint file or folder")
    return found
