"""A run folder's layout: the name of every file `soup train`, `soup import` and `soup cook` leave under
--out, in one place. Train writes them, outside writes an import's ingredients alike, data keeps outputs out
of an ingredient's folder, and cook reads a sweep's state from them; each asks here instead of spelling a name.

    <out>/                          OUT_DIR unless --out says otherwise
      <recipe name>/                a recipe folder: SUMMARY_FILE, SOUPS_FILE, LOGS_LOCK, RUNGS_DIR, SOUPS_EVENTS
        <ingredient id>/            an ingredient folder, `soup train`'s own whole:
                                    INGREDIENT_FILE, STATE_FILE (until it finishes), LOCK_FILE, METRICS_FILE
        rungs/epoch-<E>/<id>.json   a pruning decision (soup.train.prune)
      soups/<method>.safetensors    `soup cook`'s default output
"""

from __future__ import annotations

import fcntl
from pathlib import Path

OUT_DIR = "checkpoints"
INGREDIENT_FILE = "model.safetensors"
STATE_FILE = "state.pt"  # an unfinished ingredient's training state (soup.train.state)
LOCK_FILE = ".lock"  # held while a process trains the ingredient
METRICS_FILE = "metrics.json"  # the readable summary of a finished ingredient's metadata
SUMMARY_FILE = "summary.csv"  # one row per ingredient of a recipe folder (soup.train.logs)
SOUPS_FILE = "soups.csv"  # one row per soup cooked from a recipe folder's ingredients (soup.cook.record)
SOUPS_EVENTS = "soups"  # the soups' TensorBoard event files in the recipe folder: a run of its own there
LOGS_LOCK = ".logs.lock"  # not the ingredient lock's name: a recipe folder is no ingredient folder
RUNGS_DIR = "rungs"
SOUPS_DIR = "soups"


def ingredient_dir(out: str | Path, recipe_name: str, ingredient_id: str) -> Path:
    """The ingredient folder of draw `ingredient_id` of recipe `recipe_name` under `out`."""
    return Path(out) / recipe_name / ingredient_id


def ingredient_file(out: str | Path, recipe_name: str, ingredient_id: str) -> Path:
    return ingredient_dir(out, recipe_name, ingredient_id) / INGREDIENT_FILE


def rung_folder(recipe_dir: Path, epoch: int) -> Path:
    return recipe_dir / RUNGS_DIR / f"epoch-{epoch}"


def rung_file(recipe_dir: Path, epoch: int, ingredient_id: str) -> Path:
    return rung_folder(recipe_dir, epoch) / f"{ingredient_id}.json"


def default_soup_file(method: str, out: str | Path = OUT_DIR) -> Path:
    return Path(out) / SOUPS_DIR / f"{method}.safetensors"


def lock_held(folder: Path) -> bool:
    """Whether a `soup train` process holds this ingredient folder's lock now (it keeps it while training)."""
    try:
        with open(folder / LOCK_FILE) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False
