"""The on-disk store every fast path keeps its arrays in, and where such stores may live.

A store is one file: a 4 KiB header (magic, version, key, shape, dtype, CRC of the bytes) followed by the
raw array, memory-mapped when read. It is created atomically (a locked temporary renamed into place), so
a reader sees a complete store or none; a stale or corrupt one (other key, wrong size, bad CRC) reads as
missing and is rebuilt. Temporaries a killed writer left are removed by the next run that looks.

Also here: what a store's key reads of each image file (`edge_digests`), and the small helpers the
stores' users share (placement on the device, an LRU registry, sizes for humans).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import tempfile
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from rich.console import Console

from soup.models.files import atomic_path

CACHE_VERSION = 1
MAGIC = b"SOUPCACHE1\n"
HEADER_BYTES = 4096
CACHE_DIR_ENV = "SOUP_CACHE_DIR"
GB = 1e9
KEEP = 4  # stores a registry keeps open (see `remember`)
# A cache folder's stores together stay under this many GB (the least recently used go first): room for
# a few studies' prefix features at the course's scale (about 18 GB each) beside their decoded images.
BUDGET_ENV = "SOUP_CACHE_BUDGET_GB"
DEFAULT_BUDGET_GB = 64.0
STORE_PATTERNS = ("decoded-*.bin", "prefix-*.bin")


class CacheUnavailable(Exception):
    """The caches cannot be used here (no writable cache folder, data they do not cover): take the plain
    path, which is always valid."""


EDGE_BYTES = 64 << 10  # content check: this much from each end of an image file
TEMP_PATTERNS = (".decoded-*.tmp", ".prefix-*.tmp")  # soup.models.files.atomic_path's names for the stores
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


def _crc(array: np.ndarray) -> int:
    flat = array.reshape(-1).view(np.uint8)
    crc, step = 0, 64 << 20
    for start in range(0, flat.size, step):
        crc = zlib.crc32(memoryview(flat[start:start + step]), crc)
    return crc


def _header(key: str, shape: tuple, dtype: np.dtype, crc: int) -> bytes:
    meta = json.dumps({"version": CACHE_VERSION, "key": key, "shape": list(shape), "dtype": np.dtype(dtype).str,
                       "crc": crc}).encode()
    if len(MAGIC) + len(meta) > HEADER_BYTES:  # pragma: no cover - keys are short hashes
        raise ValueError("cache header too long")
    return (MAGIC + meta).ljust(HEADER_BYTES, b"\0")


def open_store(path: Path, key: str) -> np.ndarray | None:
    """The store at `path` if it is complete, uncorrupted and made for `key`; None otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if not head.startswith(MAGIC):
            return None
        header = json.loads(head[len(MAGIC):].rstrip(b"\0"))
        dtype, shape = np.dtype(header["dtype"]), tuple(header["shape"])
        if header.get("version") != CACHE_VERSION or header.get("key") != key:
            return None
        if size != HEADER_BYTES + math.prod(shape) * dtype.itemsize:
            return None
        # Copy-on-write: a writable array without touching the file (torch warns on read-only numpy).
        array = np.memmap(path, dtype=dtype, mode="c", offset=HEADER_BYTES, shape=shape)
        if _crc(array) != header["crc"]:
            return None
        with contextlib.suppress(OSError):  # used now: the last a budget evicts (another's file: as it was)
            os.utime(path)
        return array
    except (OSError, ValueError, KeyError, TypeError):
        return None


def create_store(path: Path, key: str, shape: tuple, dtype, fill: Callable[[np.ndarray], None],
                 supersedes: str | None = None) -> np.ndarray:
    """Write a store atomically: `fill` writes the array in place, then the header seals it. `supersedes`:
    a name pattern of the stores this one replaces (never read again); every other store stays, within
    the folder's budget (see `evict`)."""
    dtype = np.dtype(dtype)
    # The writer's lock outlives the rename, so no later run takes this file for a killed one's leftover.
    with contextlib.ExitStack() as writing, atomic_path(path) as tmp:
        f = writing.enter_context(writer_lock(tmp))
        reserve(f, HEADER_BYTES + math.prod(shape) * dtype.itemsize, path)
        array = np.memmap(tmp, dtype=dtype, mode="r+", offset=HEADER_BYTES, shape=shape)
        fill(array)
        array.flush()
        crc = _crc(array)
        del array
        f.write(_header(key, shape, dtype, crc))
        f.flush()
    for stale in path.parent.glob(supersedes) if supersedes else ():
        if stale != path:
            stale.unlink(missing_ok=True)
    evict(path.parent, keep=path)
    return np.memmap(path, dtype=dtype, mode="c", offset=HEADER_BYTES, shape=shape)


def budget_bytes() -> float:
    raw = os.environ.get(BUDGET_ENV)
    try:
        gb = float(raw) if raw else DEFAULT_BUDGET_GB
    except ValueError:
        gb = -1.0
    if not (math.isfinite(gb) and gb >= 0):
        if raw not in _WARNED:
            _WARNED.add(raw)
            warn(f"{BUDGET_ENV}={raw!r} is not a size in GB; using {DEFAULT_BUDGET_GB:g}")
        gb = DEFAULT_BUDGET_GB
    return gb * GB


def evict(directory: Path, keep: Path) -> list[Path]:
    """Delete the least recently used stores of `directory` (by modification time, which opening a store
    renews) until they take no more than the budget, `keep` (the one just written) never; returns them. A
    process reading an evicted store keeps its memory map; the next run that needs it rebuilds it."""
    stores = []
    for pattern in STORE_PATTERNS:
        for store in directory.glob(pattern):
            with contextlib.suppress(OSError):
                info = store.stat()
                stores.append((info.st_mtime, info.st_size, store))
    total, budget, removed = sum(size for _, size, _ in stores), budget_bytes(), []
    for _, size, store in sorted(stores, key=lambda item: item[0]):
        if total <= budget:
            break
        if store == keep:
            continue
        with contextlib.suppress(OSError):
            store.unlink()
            removed.append(store)
            total -= size
    return removed


def reserve(f: BinaryIO, nbytes: int, path: Path) -> None:
    """Give a new store its disk blocks before the memory map fills them: a disk that runs full under a
    memory map kills the process (SIGBUS), while a refused reservation only means no store. Where the file
    system cannot reserve (or the OS has no posix_fallocate) the file is sparse, as before."""
    allocate = getattr(os, "posix_fallocate", None)
    try:
        if allocate is None:
            raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
        allocate(f.fileno(), 0, nbytes)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            f.truncate(nbytes)
            return
        message = (f"cannot make the {human(nbytes)} cache store {path}: {err.strerror or err}; going on without "
                   f"it (slower): free space there or set {CACHE_DIR_ENV}")
        warn(message)
        raise CacheUnavailable(message) from None


def cache_dir(root: Path) -> Path:
    """`$SOUP_CACHE_DIR`, else `<data root>/.soup_cache`, else (read-only data) `~/.cache/soup`: the first
    one writable, cleared of store temporaries a killed run left. An unwritable `$SOUP_CACHE_DIR` is
    one warning line, not a failed run."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    refused = unwritable(Path(chosen)) if chosen else None
    if chosen and refused is None:
        candidate = Path(chosen)
    else:
        candidate = next((c for c in (Path(root) / ".soup_cache", Path.home() / ".cache" / "soup")
                          if unwritable(c) is None), None)
    if refused and chosen not in _WARNED:
        _WARNED.add(chosen)
        instead = f"caching in {candidate} instead" if candidate else "no cache folder is writable: plain path"
        warn(f"{CACHE_DIR_ENV}={chosen} is not writable ({refused}); {instead}")
    if candidate is None:
        raise CacheUnavailable(f"no writable cache folder under {root} or ~/.cache/soup")
    clean_stale_temps(candidate)
    return candidate


_WARNED: set[str] = set()  # one warning per folder and process, not one per store


def warn(message: str) -> None:
    Console(stderr=True, highlight=False).print(f"[yellow]warning[/]: {message}", soft_wrap=True)


def hash_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def human(nbytes: float) -> str:
    if nbytes >= 0.1 * GB:
        return f"{nbytes / GB:.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.0f} kB"


def fits_on_device(nbytes: int, device: torch.device, share: float) -> bool:
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < share * free


def remember(registry: OrderedDict, key, value):
    """Keep `value` under `key`, most recent last; beyond KEEP entries the oldest is dropped: a sweep
    opens each folder's store once (train, val, holdout), and a later data set evicts the oldest rather
    than pinning every store it ever saw."""
    registry[key] = value
    registry.move_to_end(key)
    while len(registry) > KEEP:
        registry.popitem(last=False)
    return value
