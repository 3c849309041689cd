"""A folder replaced whole (`soup export DIR`): the new files are written into a staging folder beside DIR,
then swapped in, so that a reader, or a kill -9 at any instant, finds the old complete folder or the new
complete one, never new weights beside an old config. Other entries of DIR are in both (hard links).
What a killed swap leaves behind (`.DIR.<random>.tmp`, `.DIR.<random>.old`) is put right by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from soup.errors import SoupError
from soup.models.files import TEMP_SUFFIX, current_umask, fsync_file, fsync_folder, write_failure

STAGING_SUFFIX = TEMP_SUFFIX  # .DIR.<random>.tmp: the new folder being filled (mkdtemp's 8 random characters)
AWAY_SUFFIX = ".old"  # .DIR.<random>.old: the previous folder moved away, where the file system cannot exchange
_RENAME_EXCHANGE = 2  # renameat2(2): swap two names in one step (Linux 3.15+, most local file systems)
_AT_FDCWD = -100


def _reached(point: str) -> None:
    """A point of the swap; tests/ship/test_hostile_ship.py kills the process here to check what a kill leaves."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def _leftovers(folder: Path) -> list[Path]:
    """Staging and moved-away folders an interrupted replacement of `folder` left beside it."""
    pattern = re.compile(re.escape(f".{folder.name}.") + r"[a-z0-9_]{8}(" + re.escape(STAGING_SUFFIX) + "|"
                         + re.escape(AWAY_SUFFIX) + ")")
    parent = folder.parent
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _real(folder: str | Path) -> Path:
    folder = Path(folder).absolute()
    return Path(os.path.realpath(folder)) if folder.is_symlink() else folder  # the folder a link names


def recover(folder: str | Path, names: tuple[str, ...]) -> list[str]:
    """`_recover`, whose failure to move or remove is one line."""
    try:
        return _recover(_real(folder), names)
    except OSError as err:
        raise SoupError(f"cannot put right what an interrupted export left beside {folder}: "
                        f"{err.strerror or err} ({err.filename}); move it by hand") from None


def _recover(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Put right what a killed replacement of `folder` left: a folder missing in the middle of the swap comes
    back (the new one when complete, else the old), and the leftovers are removed (what they share with
    `folder` are hard links or copies of its files). What was found, one sentence each."""
    found, notes = _leftovers(folder), []
    if found and not folder.exists():
        # The replaced files are written last, each whole: all of them there, the folder is complete.
        complete = [p for p in found if all((p / n).is_file() for n in names)]
        if complete:
            chosen = min(complete, key=lambda p: not p.name.endswith(STAGING_SUFFIX))  # the new one first
            os.rename(chosen, folder)
            found.remove(chosen)
            notes.append(f"{folder} was missing after an interrupted export; put back the "
                         f"{'new' if chosen.name.endswith(STAGING_SUFFIX) else 'previous'} complete one")
    for leftover in found:
        shutil.rmtree(leftover)
        notes.append(f"removed {leftover.name}, left by an interrupted export of {folder}")
    return notes


def _swap_in(staging: Path, folder: Path) -> Path:
    """`staging` becomes `folder`; the previous folder's path, now holding the old files only."""
    if _exchange(staging, folder):
        return staging
    away = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=AWAY_SUFFIX, dir=folder.parent))
    os.rename(folder, away)  # onto the empty folder just made, as rename(2) allows
    _reached("moved away")
    os.rename(staging, folder)
    return away


def _link(entry: Path, target: Path) -> None:
    """`target` the same as `entry`: a hard link (no copy, no second version of the data), else a copy."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry), target)
    elif entry.is_dir():
        try:
            shutil.copytree(entry, target, symlinks=True, copy_function=os.link)
        except (OSError, shutil.Error):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(entry, target, symlinks=True)
    else:
        try:
            os.link(entry, target)
        except OSError:
            shutil.copy2(entry, target)


def _fill(staging: Path, writers: dict[str, Callable[[Path], object]], folder: Path) -> None:
    """Every other entry of `folder` first, then the new files: once they are all there, `staging` is whole."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name not in writers:
                _link(entry, staging / entry.name)
        _reached("linked others")
    for name, write in writers.items():
        # Each file appears under its name only once whole (synced): recovery counts on it.
        partial = staging / f".{name}.partial"
        write(partial)
        fsync_file(partial)
        os.replace(partial, staging / name)
        _reached(f"wrote {name}")
    mode = stat.S_IMODE(folder.stat().st_mode) if folder.is_dir() else 0o777 & ~current_umask()
    os.chmod(staging, mode)  # mkdtemp's 0700 would hide a shared export from its readers


def replace_folder(folder: str | Path, writers: dict[str, Callable[[Path], object]]) -> list[str]:
    """`folder` holding the files `writers` write (name -> write(path)) and every other entry it had; it
    changes in one step. What leftovers of an earlier interrupted replacement were found, one sentence each."""
    folder, names = _real(folder), tuple(writers)
    notes = recover(folder, names)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=STAGING_SUFFIX, dir=folder.parent))
    except OSError as err:
        raise SoupError(f"cannot write {folder}: {err.strerror or err}; choose a writable folder") from None
    try:
        _fill(staging, writers, folder)
        if folder.is_dir() and any(folder.iterdir()):
            old = _swap_in(staging, folder)
            _reached("swapped")
            shutil.rmtree(old, ignore_errors=True)  # DIR is new by now: what stays, the next export removes
        else:
            os.replace(staging, folder)  # a missing or empty DIR is replaced, as rename(2) allows
        fsync_folder(folder.parent)  # the swap itself survives a power loss
    except BaseException as err:  # a failed write, a full disk, Ctrl-C: nothing half-done stays beside DIR
        with contextlib.suppress(OSError, SoupError):  # the first failure is the one to report
            _recover(folder, names)
        reason = write_failure(err)  # the system's reason, also when a writer wrapped it (safetensors)
        if reason is None:
            raise
        raise SoupError(f"cannot write {folder}: {reason}; it was left as it was") from None
    return notes
