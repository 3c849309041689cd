"""Writing files whole or not at all: a temporary file beside the name, synced, then renamed into place
(soup's every output goes through `atomic_path`), and the system's reason in one line when a write fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from soup.errors import SoupError

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
