"""The cache's files: where they may go, what a store's key reads of each image file, and what a killed
writer left behind. (The stores themselves: soup.cache.)"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Iterator

EDGE_BYTES = 64 << 10  # content check: this much from each end of an image file
TEMP_PATTERNS = (".decoded-*.tmp", ".prefix-*.tmp")  # soup.checkpoint.atomic_path's names for the stores
TEMP_GRACE_S = 60.0  # a temporary file younger than this may not be locked by its writer yet


def unwritable(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (made if missing), or None when they can. A real write
    attempt: permission bits say nothing to root, nor about a read-only mount."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".soup-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or str(err)
    return None


def edge_digest(path: str) -> str:
    """A hash of the first and last 64 KiB of a file (all of it when smaller): a replaced image of the same
    size and mtime changes it, and reading it costs a fraction of decoding."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        head = f.read(EDGE_BYTES)
        digest.update(head)
        if len(head) == EDGE_BYTES:
            f.seek(max(EDGE_BYTES, os.fstat(f.fileno()).st_size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def edge_digests(paths: list[str]) -> list[str]:
    # Small reads that wait on the disk, and hashing releases the GIL: threads overlap them.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        return list(pool.map(edge_digest, paths))


@contextlib.contextmanager
def writer_lock(tmp: Path) -> Iterator[BinaryIO]:
    """The open temporary file, exclusively locked while its writer lives: the kernel drops the lock when
    the process dies, so a later run tells a killed writer's leftover from a file being written."""
    with open(tmp, "r+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield handle


def clean_stale_temps(directory: Path) -> list[Path]:
    """Delete the store temporaries in `directory` that no live process is writing; returns them."""
    removed = []
    for pattern in TEMP_PATTERNS:
        for tmp in directory.glob(pattern):
            try:
                if time.time() - tmp.stat().st_mtime < TEMP_GRACE_S:
                    continue
                with open(tmp, "rb") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a writer holds it
                    tmp.unlink()
                removed.append(tmp)
            except OSError:  # being written, already gone, or not ours to delete: leave it
                continue
    return removed
