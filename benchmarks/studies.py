"""The study loop soup_gain.py, prune_gain.py and best_protocol.py share: studies seeded by their index
from --first, each in a folder of its own under --work (kept) or a temporary folder (removed at the end)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable


def run_studies(args, prefix: str, study: Callable[[int, Path], dict],
                done: Callable[[int, float], str] | None = None) -> tuple[list[dict], float]:
    """`study(index, folder)` for each study; `done(index, seconds)` is the line printed after each (None:
    none). Returns the studies' results and when the loop started (time.perf_counter)."""
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    started, results = time.perf_counter(), []
    try:
        for index in range(args.first, args.first + args.studies):
            results.append(study(index, work / f"study{index}"))
            if done is not None:
                print(done(index, time.perf_counter() - started), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return results, started
