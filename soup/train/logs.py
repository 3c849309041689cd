"""Logs: watch a run while it trains, and compare the trials of a search.

With `train.log: tensorboard` (the default) and the optional extra installed (`pip install
'soup[tensorboard]'`), every ingredient and the probed start write TensorBoard event files into their own
folder: train loss and lr at the loop's existing read-backs of the losses (no extra wait on the device),
per epoch the val figures and images/s, and at the end the ingredient's settings as hparams with its final
val figures, so that TensorBoard's HPARAMS view lines the trials of a search up. Every figure is logged at
the optimizer step it belongs to: a resumed run tells TensorBoard to drop what a killed one logged after
its saved state (`purge_step`) and appends from there, so nothing shows twice.

Without any extra, `<out>/<name>/summary.csv` holds one row per ingredient, with its status. It is rebuilt from the
checkpoints' metadata under a lock, never appended to, so parallel `--ingredient K` processes converge on
the same file whoever writes last.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
from pathlib import Path

from rich.console import Console

from soup.errors import SoupError
from soup.models import distributed
from soup.models.checkpoint import read_checkpoint
from soup.models.files import write_text_atomic
from soup.models.runs import INGREDIENT_FILE, LOGS_LOCK, STATE_FILE, SUMMARY_FILE
from soup.models.records import Record
from soup.text import first_time
from soup.train.state import open_lock_file

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # the optional extra: without it the event files are off, training is not
    SummaryWriter = None

INSTALL = "pip install 'soup[tensorboard]'"
FIGURES = ("status", "val_acc", "raw_val_acc", "epochs", "seconds", "images_per_s")
# An epoch record's figures -> their tags (raw_*: the trained weights' own, when the checkpoint holds an EMA).
EPOCH_TAGS = {"train_loss": "train/loss", "val_top1": "val/top1", "val_top5": "val/top5", "val_loss": "val/nll",
              "raw_val_top1": "val/raw_top1", "raw_val_top5": "val/raw_top5", "raw_val_loss": "val/raw_nll",
              "images_per_s": "speed/images_per_s"}
# The final record's figures the HPARAMS view sorts trials by (own tags: hparams metrics are read by tag).
HPARAM_METRICS = {"val_top1": "hparams/val_top1", "val_loss": "hparams/val_nll", "raw_val_top1": "hparams/raw_val_top1",
                  "raw_val_loss": "hparams/raw_val_nll"}


def available() -> bool:
    return SummaryWriter is not None


def notice(log: str, console: Console) -> None:
    """The one line a command prints when its recipe asks for event files that cannot be written (once per
    command: soup.text.first_time)."""
    if log == "tensorboard" and not available() and first_time("tensorboard-off"):
        console.print(f"logs: TensorBoard is not installed, so no event files are written (summary.csv still "
                      f"is); {INSTALL} turns them on", markup=False)


def hparam_value(value):
    """What add_hparams takes: numbers, strings and booleans as they are, anything else (null, a list) as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class Logs:
    """One run's event files; every call does nothing when logs are off (no writer)."""

    def __init__(self, writer=None, steps_per_epoch: int = 1):
        self.writer, self.steps_per_epoch = writer, steps_per_epoch

    def step(self, epoch: int, step: int, loss: float, lr: float) -> None:
        """The epoch's mean loss so far after `step` steps of it, as read back for the NaN check (at the
        epoch's last step `epoch` logs the same figure)."""
        if self.writer is not None and step < self.steps_per_epoch:
            at = epoch * self.steps_per_epoch + step
            self.writer.add_scalar("train/loss", loss, at)
            self.writer.add_scalar("train/lr", lr, at)

    def epoch(self, record: dict, lr: float) -> None:
        if self.writer is None:
            return
        at = record["epoch"] * self.steps_per_epoch
        for key, tag in EPOCH_TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], at)
        self.writer.add_scalar("train/lr", lr, at)
        rung = record.get("rung")  # a search.prune decision at this epoch: what it was compared with, and how
        if isinstance(rung, dict) and rung.get("threshold") is not None:
            self.writer.add_scalar("prune/threshold", rung["threshold"], at)
            self.writer.add_scalar("prune/pruned", float(rung["pruned"]), at)
        self.writer.flush()  # a TensorBoard watching the run sees each epoch as it ends

    def hparams(self, settings: dict, record: dict) -> None:
        if self.writer is None or not settings:
            return
        metrics = {tag: record[key] for key, tag in HPARAM_METRICS.items() if key in record}
        # run_name ".": the hparams land in the run's own folder, one HPARAMS row per ingredient.
        self.writer.add_hparams({k: hparam_value(v) for k, v in settings.items()}, metrics, run_name=".",
                                global_step=record["epoch"] * self.steps_per_epoch)


@contextlib.contextmanager
def opened(run):
    """`run.events` for the run's epochs (soup.train.loop.Run): event files in its folder when the recipe
    asks for them, TensorBoard is installed and this is the main process; closed at the end."""
    steps = run.pipeline.steps_per_epoch
    writer = None
    if run.recipe.train.log == "tensorboard" and available() and distributed.world().main:
        writer = SummaryWriter(str(run.run_dir), purge_step=run.first_epoch * steps + 1)
    run.events = Logs(writer, steps)
    try:
        yield run.events
    finally:
        if writer is not None:
            writer.close()


def finished(events: Logs, record: Record, run_dir: Path) -> None:
    """A finished run's hparams, and summary.csv rewritten with its row (ingredients only: not the probe)."""
    events.hparams(record.settings or {}, record.history[-1])
    if record.kind == "ingredient":
        write_summary(run_dir.parent)


@contextlib.contextmanager
def locked(folder: Path):
    """The recipe folder's logs lock: one writer of summary.csv or soups.csv at a time, waited for."""
    with open_lock_file(folder, LOGS_LOCK) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def spreadsheet_cell(value):
    """A cell of a CSV that people open in a spreadsheet: text that would start a formula (a setting or a
    file name like `=1+2`, `@SUM(A1)`) gets a leading ' so it shows as written and never runs; numbers stay."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def spreadsheet_rows(rows: list[dict]) -> list[dict]:
    return [{key: spreadsheet_cell(value) for key, value in row.items()} for row in rows]


def summary_row(record: Record) -> dict:
    history = record.history
    seconds = sum(r.get("seconds", 0.0) for r in history)
    images = sum(r.get("seconds", 0.0) * r.get("images_per_s", 0.0) for r in history)
    # pruned: stopped at a rung of search.prune (its epochs say which); running: no checkpoint yet.
    return {"id": record.id, **(record.settings or {}), "status": "pruned" if record.pruned else "finished",
            "val_acc": record.val_acc,
            "raw_val_acc": record.val_acc if record.raw_val_acc is None else record.raw_val_acc,
            "epochs": len(history),
            "seconds": seconds if seconds else "", "images_per_s": images / seconds if seconds else ""}


def write_summary(folder: Path) -> Path:
    """`folder`/summary.csv: one row per ingredient in it (finished, pruned, or running: a saved state and no
    checkpoint), sorted by id; the columns are id, every setting any of them has (sorted) and FIGURES."""
    with locked(folder):
        rows = []
        for path in sorted(folder.glob(f"*/{INGREDIENT_FILE}")):
            with contextlib.suppress(SoupError):  # a damaged checkpoint is cook's to name, not this table's
                record = read_checkpoint(path).record
                if record.kind == "ingredient":
                    rows.append(summary_row(record))
        rows += [{"id": state.parent.name, "status": "running"} for state in sorted(folder.glob(f"*/{STATE_FILE}"))
                 if not (state.parent / INGREDIENT_FILE).exists()]
        rows.sort(key=lambda row: str(row["id"]))
        settings = sorted({key for row in rows for key in row} - {"id", *FIGURES})
        text = io.StringIO()
        writer = csv.DictWriter(text, ["id", *settings, *FIGURES], restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(spreadsheet_rows(rows))
        write_text_atomic(folder / SUMMARY_FILE, text.getvalue())
    return folder / SUMMARY_FILE


def finished_line(history: list[dict], first_epoch: int, ingredient_id: str, console: Console) -> None:
    """The one line a finished ingredient prints: its epochs' figures are in summary.csv and TensorBoard, and a
    terminal showed them on its progress bar."""
    last, seconds = history[-1], sum(h["seconds"] for h in history[first_epoch:])
    ema = f" (EMA; raw weights {last['raw_val_top1']:.2%})" if "raw_val_top1" in last else ""
    rate = sum(h["images_per_s"] for h in history) / len(history)
    # Under 80 columns for ids up to ~40 characters (the demo's search draws ~35).
    console.print(f"  {ingredient_id}: val {last['val_top1']:.2%}{ema}, {len(history)} epoch"
                  f"{'s' * (len(history) != 1)}, {seconds:.0f} s, {rate:,.0f} img/s")
