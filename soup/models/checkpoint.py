"""Checkpoints: fp32 weights in one safetensors file, with the soup metadata that later stages rely on.

Metadata (JSON under the "soup" key) holds the resolved recipe, backbone id, class list, a fingerprint of
the starting weights, and for soups the method and members. Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from soup.errors import SoupError
from soup.models.metadata import check_metadata

FORMAT = "soup/1"
METADATA_KEY = "soup"
INGREDIENT_FILE = "model.safetensors"
STATE_FILE = "state.pt"  # an unfinished ingredient's training state (soup.train.state)
LOCK_FILE = ".lock"  # held while a process trains the ingredient
TEMP_SUFFIX = ".tmp"  # atomic_path's temporary files: .<name>.<random>.tmp beside <name>


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_failure(err: BaseException) -> str | None:
    """The system's reason when a writer failed on I/O (disk full, file too large, read-only, EIO), else None.

    Libraries wrap it: torch.save re-raises a file object's OSError as a RuntimeError (the OSError is its
    context), and safetensors reports "I/O error: ... (os error N)"."""
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, SoupError):
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ if seen.__cause__ is not None or seen.__suppress_context__ else seen.__context__
    match = re.search(r"\(os error (\d+)\)", str(err))
    if isinstance(err, SafetensorError) and match:
        return os.strerror(int(match.group(1)))
    return None


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; where the file system or permissions do not allow syncing a
    folder, the renamed file itself was synced before the rename."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def place_new(tmp: str | Path, path: Path) -> None:
    """Move `tmp` to `path` only if nothing is there, atomically: a hard link fails on an existing name, so
    of several commands racing to one new output exactly one wins. Where the file system has no hard links
    (some network and FUSE ones), an exclusive create claims the name first (O_EXCL), then the rename fills it."""
    taken = SoupError(f"{path} exists: another command wrote it while this one ran, and it was left as it is; add "
                      "--overwrite to replace it, or write elsewhere with -o")
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise taken from None
    except OSError:
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise taken from None
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path, replace: bool = True):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes (without
    `replace`, it takes `path` only if nothing is there by then; see `place_new`).

    The temporary file is synced to disk before the rename and the folder after it, so that after a power
    loss `path` holds the old file or the whole new one, never an empty one. Any write failure is one
    SoupError naming `path`, which is then unchanged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise SoupError(f"cannot write {path}: {err.strerror or err}; choose a writable folder") from None
    try:
        yield Path(tmp)
        fsync_file(tmp)
        # Temp files are 0600 (mkstemp, and safetensors writes its own); a shared output folder needs a
        # normal file's permissions (umask applies), so that whoever cooks can read what every job wrote.
        os.chmod(tmp, 0o666 & ~current_umask())
        if replace:
            os.replace(tmp, path)
        else:
            place_new(tmp, path)
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise SoupError(f"cannot write {path}: {reason}; nothing was changed there") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    try:
        fsync_folder(path.parent)
    except OSError as err:
        raise SoupError(f"cannot write {path}: {err.strerror or err} while syncing its folder; the new file is "
                        "in place but may not survive a power loss") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def fp32_state(state_dict: dict) -> dict[str, torch.Tensor]:
    """Floating tensors as fp32 (AMP never leaks into a checkpoint); integer buffers untouched."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state_dict.items()}


def save_checkpoint(path: str | Path, state_dict: dict, meta: dict, replace: bool = True) -> Path:
    meta = {"format": FORMAT, **meta}
    with atomic_path(path, replace) as tmp:
        save_file(fp32_state(state_dict), str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    return Path(path)


def rewritable(path: str | Path) -> Path:
    """The file that rewriting `path` in place must replace: a symlink's target (replacing the link would
    leave the file it names as it was). A file with other hard links is refused: an atomic rewrite makes a
    new file under this name only, and writing in place could leave a half-written file behind."""
    target = Path(path).resolve()
    links = target.stat().st_nlink if target.is_file() else 1
    if links > 1:
        raise SoupError(f"{path} has {links} hard links, and rewriting it would change this name alone; rewrite a "
                        "copy of it (cp), or remove its other links first")
    return target


def rewrite_metadata(path: str | Path, meta: dict) -> Path:
    """Replace a checkpoint's soup metadata, atomically, in the file `path` names (see `rewritable`). Its
    tensors are written back as read: a soup checkpoint holds fp32 and integer tensors only, which
    save_checkpoint keeps byte for byte."""
    target = rewritable(path)
    save_checkpoint(target, Checkpoint(target, meta).state_dict(), meta)
    return Path(path)


@dataclass
class Checkpoint:
    path: Path
    meta: dict

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "ingredient")

    @property
    def name(self) -> str:
        if self.kind == "ingredient":
            return f"{self.meta.get('name', '?')}/{self.meta.get('id', self.path.parent.name)}"
        return self.path.stem

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def fingerprint(self) -> str:
        return self.meta["start_fingerprint"]

    @property
    def recipe(self) -> dict:
        return self.meta["recipe"]

    def tensor_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        with _open(self.path) as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Its tensors, every floating one checked finite as it is read (see `finite`)."""
        with _open(self.path) as f:
            return {k: finite(self.path, k, f.get_tensor(k)) for k in f.keys()}

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
    missing = [k for k in ("classes", "backbone", "start_fingerprint", "recipe") if k not in meta]
    if missing:
        raise SoupError(f"{path}: soup metadata lacks {', '.join(missing)}; the file is damaged")
    types = {"classes": list, "backbone": str, "start_fingerprint": str, "recipe": dict, "kind": str}
    wrong = [k for k, kind in types.items() if k in meta and not isinstance(meta[k], kind)]
    if wrong or not all(isinstance(c, str) for c in meta["classes"]):
        raise SoupError(f"{path}: soup metadata has a wrong type in {', '.join(wrong) or 'classes'}; the file "
                        "is damaged")
    twice = next((name for name, count in Counter(meta["classes"]).items() if count > 1), None)
    if twice is not None:  # the class folders could never match it: it is the metadata that is wrong
        raise SoupError(f"{path}: soup metadata's classes name {twice!r} twice; the file's metadata was edited "
                        "or damaged")
    check_metadata(path, meta, head_rows)
    return Checkpoint(path, meta)


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
