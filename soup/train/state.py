"""An ingredient's folder between runs: the lock, the saved training state (`state.pt`, RNG included),
the checks a resume makes against it, and what finishing leaves there (the checkpoint, metrics.json).

Training (soup.train.loop) calls these; they know nothing of the epoch loop. Every check compares recipes
normalised (read back through `recipe_from_dict`), so a key added to recipes later, at its default,
does not make an older checkpoint or state count as another version of the recipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from soup.errors import Interrupted, SoupError
from soup.models.checkpoint import read_checkpoint
from soup.models.files import TEMP_SUFFIX, atomic_path, write_text_atomic
from soup.models.runs import INGREDIENT_FILE, LOCK_FILE, METRICS_FILE, STATE_FILE
from soup.models.records import Record
from soup.recipe.spec import Ingredient, recipe_from_dict, resumable

# What metrics.json shows of a checkpoint's metadata, followed by the facts of the run (its record's `run`).
METRICS_KEYS = ("name", "id", "settings", "seed", "backbone", "start_fingerprint", "val_acc", "raw_val_acc",
                "probe", "pruned", "val_history")
# 2: the lr scheduler steps once per optimizer step (1 stepped once per epoch: not resumable as 2).
STATE_FORMAT = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def normalised(recipe: dict | None) -> dict | None:
    """A recorded recipe as this version of soup reads it (new keys at their defaults, reporting keys such
    as train.log left out: logging differently is not another version of the recipe); None if it no
    longer reads at all."""
    try:
        return resumable(recipe_from_dict(recipe).to_dict()) if isinstance(recipe, dict) else None
    except SoupError:
        return None


def save_state(path: Path, model, optimizer, scaler, schedule, epoch: int, history: list, meta: dict,
               extra: dict | None = None) -> None:
    """`extra`: more state that trains alongside (the EMA's weights), restored by the caller."""
    # Frozen tensors never change and a resume rebuilds them from the same start (the fingerprint in
    # `meta` is checked), so the state holds only what trains: a quarter of ViT-B/14 at freeze 0.75.
    frozen = frozen_names(model)
    changing = {k: v for k, v in model.state_dict().items() if k not in frozen}
    state = {"format": STATE_FORMAT, "model": changing, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "schedule": schedule.state_dict(), "epoch": epoch, "history": history,
             "rng": rng_state(), "meta": meta, **(extra or {})}
    # Through a file object: torch.save then reports a failed write (disk full) as that OSError's context.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SoupError(f"{path}: cannot read the saved training state ({type(err).__name__}); delete it "
                        "to start this ingredient over") from None


def resume_state(path: Path, identity: dict, model, optimizer, scaler, schedule) -> dict:
    """Load `path` into the training objects after checking it belongs to this run; returns the state
    (its epoch, history, RNG and extras are the caller's). `identity`: what the state must have been saved
    with (its recipe and start fingerprint, as save_state stored them)."""
    state = load_state(path)
    if state.get("format") != STATE_FORMAT:
        raise SoupError(f"{path} was saved by an older version of soup (its lr schedule stepped per epoch); "
                        "delete it to start over")
    saved = state["meta"]
    expected = {**identity, "recipe": resumable(identity.get("recipe"))}
    if {**saved, "recipe": normalised(saved.get("recipe"))} != expected:
        raise SoupError(f"{path} was saved by a different recipe or start; delete it to start over")
    result = model.load_state_dict(state["model"], strict=False)
    if result.unexpected_keys or set(result.missing_keys) != frozen_names(model):
        raise SoupError(f"{path} does not fit this model (freeze or architecture changed); delete it "
                        "to start over")
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    schedule.load_state_dict(state["schedule"])
    set_rng_state(state["rng"])
    return state


def open_lock_file(folder: Path, name: str):
    """The lock file `name` in `folder` (made if missing), open for flock; one line when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / name, "w")
    except OSError as err:
        raise SoupError(f"cannot write {folder}: {err.strerror or err}; choose a writable --out") from None


@contextlib.contextmanager
def ingredient_lock(run_dir: Path, wait: bool = False):
    """One process per ingredient: a second `soup train --ingredient K` on the same folder stops at once
    (with `wait`, it waits for the first one instead: the probed start every ingredient shares)."""
    with open_lock_file(run_dir, LOCK_FILE) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            raise SoupError(f"{run_dir}: another process is training this ingredient; wait for it or use "
                            "another --out") from None
        with contextlib.suppress(OSError):  # the pid only informs whoever looks; a full disk must not stop here
            os.write(handle.fileno(), str(os.getpid()).encode())
        yield


@contextlib.contextmanager
def resume_hint_on_interrupt(ingredient_id: str, saved_epochs: list[int]):
    """Ctrl-C (or SIGTERM) anywhere in training: one line saying what is saved and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        done = (f"its state after epoch {saved_epochs[0]} is saved" if saved_epochs[0]
                else "no epoch had finished, so nothing was saved")
        raise Interrupted(f"{ingredient_id}: interrupted; {done}; run the same command with --resume to "
                          "continue") from None


def remove_stale_temps(run_dir: Path) -> None:
    """Temporary files (states, checkpoints) of a run killed while writing: whoever holds the ingredient's
    lock is the only writer in its folder, so none of them is being written now."""
    for stale in run_dir.glob(f".*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def write_metrics(run_dir: Path, record: Record) -> None:
    """metrics.json, the readable summary of a checkpoint's record (and so rebuilt from it when needed)."""
    stored = record.dump()
    metrics = {k: stored[k] for k in METRICS_KEYS if k in stored} | (record.run or {})
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")


def is_finished(ingredient: Ingredient, run_dir: Path, resume: bool, console: Console, main: bool = True,
                announce: bool = True) -> bool:
    """Whether the ingredient is trained (with --resume; without, a trained or started one is refused).
    Finishing is idempotent: what a kill right after the checkpoint's rename left undone (metrics.json,
    removing the state) is done here, by the lock holder. `announce`: say that it is skipped (a shared
    probed start is reported by its user instead; a repair is always said)."""
    recipe, final, state_path = ingredient.recipe, run_dir / INGREDIENT_FILE, run_dir / STATE_FILE
    if not final.exists():
        if state_path.exists() and not resume:
            raise SoupError(f"{state_path} holds an unfinished run of this ingredient; add --resume to "
                            "continue it, or delete it to start over")
        return False
    if not resume:
        raise SoupError(f"{final} exists: this ingredient is trained; use --resume to skip finished "
                        "ingredients, or another --out")
    # A shared --out may hold this name and id from another version of the recipe (e.g. other epochs:
    # ids only name swept values); skipping it would cook a stranger into the soup.
    checkpoint = read_checkpoint(final)
    if normalised(checkpoint.recipe) != resumable(recipe.to_dict()):
        raise SoupError(f"{final} was trained from a different version of this recipe; rename the recipe "
                        "(name:) or use another --out, or delete that ingredient to retrain it")
    completed = []
    if main and not (run_dir / METRICS_FILE).exists():
        write_metrics(run_dir, checkpoint.record)
        completed.append(f"wrote the missing {METRICS_FILE}")
    if main and state_path.exists():
        state_path.unlink()
        completed.append(f"removed the stale {STATE_FILE}")
    done = f" ({'; '.join(completed)})" if completed else ""
    if announce or completed:
        console.print(f"[bold]{recipe.name}/{ingredient.id}[/]: finished already, skipped{done}")
    return True
