"""Training: one ingredient per resolved recipe, read top to bottom (a whole sweep: soup.train.sweep).

`train_ingredient` sets a run up (data, model, optimizer and lr schedule from soup.train.schedule, data
path), resumes it if asked, trains epoch by epoch and finishes (checkpoint, metrics.json, state removed);
the lock and DDP are context managers around it. Every epoch the full training state is saved atomically (`state.pt`, soup.train.state), so a killed
run resumes where it was (`soup train --resume`) and ends with the same weights as an uninterrupted one:
the data order and the mixup draws of each epoch depend only on (seed, rank, epoch), and RNG states
travel with the state. The lr follows soup.train.schedule per optimizer step; label smoothing, mixup/cutmix
(soup.data.augment), gradient clipping and an EMA of the weights (soup.train.schedule.EMA) apply as the recipe says.
With `model.probe`, the probed start (soup.train.probe) is trained first, once, and every ingredient starts
from it. No step reads a value back from the device: the losses stay there and are checked for NaN every
CHECK_EVERY steps and at the end of each epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from soup.data.augment import Mixer, classification_loss, make_mixer, mix_generator
from soup.data.folders import class_list, load_split
from soup.data.pipeline import Pipeline
from soup.errors import SoupError, interrupt_on_signals
from soup.fast.build import build_pipeline
from soup.models import distributed
from soup.models.backbones import build_model, fingerprint, freeze_prefix, train_mode
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.models.inference import resolve_device
from soup.models.precision import choose_autocast, explicit_attention, unfused_attention_modules
from soup.models.records import Probe, Record, Start
from soup.models.runs import INGREDIENT_FILE, OUT_DIR, STATE_FILE, ingredient_dir
from soup.recipe.spec import Ingredient, Recipe
from soup.text import first_time
from soup.train import logs, prune, schedule
from soup.train.probe import KIND as PROBE, load_probe, probe_file, probe_ingredient
from soup.train.state import (ingredient_lock, is_finished, remove_stale_temps, resume_hint_on_interrupt, resume_state,
                              save_state, seed_everything, write_metrics)

HEARTBEAT_S = 300  # without a terminal (no bar), the least time between two epoch lines of one run
CHECK_EVERY = 200  # steps between reads of the losses (NaN check, progress); each read waits for the device
DIVERGED = re.compile(r"overflow|\bnan\b|\binf\b|non-finite", re.IGNORECASE)  # a step failing on its numbers


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """The step schedule's multiplier in epoch `epoch` (0-based; epochs count from 1 in the recipe, so
    lr_drop_epoch 7 trains epochs 7, 8, ... at the lower rate); soup.train.schedule has it per step."""
    return schedule.lr_factor(dataclasses.replace(recipe.train, warmup_epochs=0.0), epoch, 1)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), console=console, transient=True,
                    disable=not console.is_terminal)  # elsewhere (a log file) it would leave blank lines


@dataclass
class Run:
    """Everything one ingredient's training holds, built by `set_up`."""

    ingredient: Ingredient
    run_dir: Path
    console: Console
    kind: str  # "ingredient" or soup.train.probe.KIND
    device: torch.device
    classes: list[str]
    n_train: int
    skipped: list
    model: nn.Module  # the full model: what is saved
    pipeline: Pipeline
    step_model: nn.Module  # what a step runs: the pipeline's model, under DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    ema: schedule.EMA | None
    mixer: Mixer | None
    unfused: list[nn.Module]  # attention modules a step runs unfused (soup.models.precision.explicit_attention)
    start_fingerprint: str  # the weights it starts from (a saved state must match them, and the recipe)
    counts: dict  # parameter counts, for metrics.json
    probe: dict | None = None  # the probed start this run began from
    history: list = dataclasses.field(default_factory=list)
    events: logs.Logs = dataclasses.field(default_factory=logs.Logs)  # its TensorBoard logs (soup.train.logs)
    first_epoch: int = 0
    said_at: float = dataclasses.field(default_factory=time.monotonic)  # its last line (HEARTBEAT_S)

    @property
    def recipe(self) -> Recipe:
        return self.ingredient.recipe

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE


def train_ingredient(ingredient: Ingredient, out: str | Path = OUT_DIR, console: Console | None = None,
                     resume: bool = False, use_cache: bool = True, kind: str = "ingredient") -> Path:
    """Fine-tune one ingredient; returns the path of its checkpoint.

    Under torchrun (inside `distributed.session`, which `train_recipe` opens) every rank runs this with
    DDP on its share of each global batch; rank 0 alone prints and writes files."""
    w = distributed.world()
    if w.distributed and not distributed.initialized():
        raise RuntimeError("train_ingredient under torchrun needs a process group: call it inside "
                           "soup.models.distributed.session() (train_recipe does)")
    console = console or Console()
    if not w.main:
        console = Console(quiet=True)  # N processes, one voice: rank 0's
    probe = ensure_probe(ingredient.recipe, out, console, use_cache)
    run_dir = ingredient_dir(out, ingredient.recipe.name, ingredient.id)
    # Lock first, then look: a process that looked first could see "unfinished", build its model while
    # another one finishes, then take the lock and train again over that checkpoint. Rank 0 holds the lock
    # for the whole group: the other ranks would find it taken. A probe shared by parallel ingredient
    # processes is waited for, not refused.
    with ingredient_lock(run_dir, wait=kind == PROBE) if w.main else contextlib.nullcontext():
        if w.main:
            remove_stale_temps(run_dir)
        if is_finished(ingredient, run_dir, resume or kind == PROBE, console, w.main, announce=kind != PROBE):
            return run_dir / INGREDIENT_FILE
        run = set_up(ingredient, run_dir, console, use_cache, probe, kind)
        if resume and run.state_path.exists():
            resume_run(run)
        saved_epochs = [run.first_epoch]
        t = run.recipe.train
        with (resume_hint_on_interrupt(ingredient.id, saved_epochs), interrupt_on_signals(),
              _progress(console) as progress, logs.opened(run)):
            epochs = progress.add_task(f"{ingredient.id.split('-')[0]} epochs", total=t.epochs,
                                       completed=run.first_epoch, status="")
            for epoch in range(run.first_epoch, t.epochs):
                if prune.stopped(run.history):
                    break  # a rung stopped it (and the state after that epoch was saved before a kill)
                record = train_epoch(run, epoch, progress)
                record |= prune.at_rung(run, record)
                run.history.append(record)
                run.events.epoch(record, run.optimizer.param_groups[-1]["lr"])
                progress.update(epochs, advance=1, status=f"val {record['val_top1']:.2%}")
                if w.main:
                    save_state(run.state_path, run.model, run.optimizer, run.scaler, run.schedule, epoch + 1,
                               run.history, identity(run), {"ema": run.ema.state_dict()} if run.ema else None)
                saved_epochs[0] = epoch + 1
            path = finish(run)
            if not prune.stopped(run.history):  # a pruned run said why it stopped, at its rung
                logs.finished_line(run.history, run.first_epoch, ingredient.id, console)
            return path


def ensure_probe(recipe: Recipe, out: str | Path, console: Console, use_cache: bool) -> dict | None:
    """The probed start `recipe` begins from (None without model.probe): trained here unless a run before
    this one (or a parallel process, waited for) trained it already."""
    item = probe_ingredient(recipe)
    if item is None:
        return None
    trained_before = probe_file(recipe, out).exists()
    path = train_ingredient(item, out, console, resume=True, use_cache=use_cache, kind=PROBE)
    acc = read_checkpoint(path).record.val_acc
    if first_time(f"probed start {item.id}"):  # once per command: a search's draws share one probe
        console.print(f"  probed start {item.id}: frozen backbone + linear head, val acc {acc:.2%}"
                      f"{' (trained earlier, reused)' if trained_before else ''}")
    return {"id": item.id, "path": path, "val_acc": acc}


def set_up(ingredient: Ingredient, run_dir: Path, console: Console, use_cache: bool, probe: dict | None,
           kind: str) -> Run:
    """Data, model (from the probed start when there is one), optimizer, schedule and data path."""
    w = distributed.world()
    recipe, t = ingredient.recipe, ingredient.recipe.train
    device = distributed.rank_device(resolve_device(t.device), w)
    seed_everything(t.seed)

    classes = class_list(recipe.data.root)
    train_set = load_split(recipe.data, "train", train=True, classes=classes)
    val_set = load_split(recipe.data, "val", classes=classes)
    skipped = train_set.skipped + val_set.skipped
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable images[/] (data.skip_bad_images), e.g. {skipped[0]}")
    model = build_model(recipe.model, classes, recipe.data.image_size)
    if probe is not None:
        load_probe(model, probe["path"])
    start_fingerprint = fingerprint(model)
    frozen, backbone_total = freeze_prefix(model.backbone, recipe.model.freeze)
    model, synced_bn = distributed.sync_batchnorm(model, device)
    counts = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in model.parameters())}
    # Said once per command for all the ingredients it holds (below, with the data path): their id comes on
    # the line each prints when it finishes.
    setup = (f"[bold]{recipe.name}[/]{' (probe)' if kind == PROBE else ''}: {counts['trainable_params']:,} of "
             f"{counts['total_params']:,} parameters train ({frozen:,} of {backbone_total:,} backbone "
             f"parameters frozen); {len(train_set)} train / {len(val_set)} val images, {len(classes)} "
             f"classes, {device}")

    model.to(device)
    optimizer = schedule.make_optimizer(t, schedule.param_groups(model, t))
    amp_dtype, amp_why = choose_autocast(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # Each rank's pipeline batches its share of the global batch; checkpoints keep the recipe as written.
    rank_batch = distributed.per_rank_batch(t.batch_size, w)
    rank_recipe = (dataclasses.replace(recipe, train=dataclasses.replace(t, batch_size=rank_batch))
                   if w.distributed else recipe)
    pipeline = build_pipeline(rank_recipe, model, train_set, val_set, device, use_cache)
    train_module = distributed.wrap(pipeline.model, device)  # DDP for the step only; saves use `model`
    run = Run(ingredient, run_dir, console, kind, device, classes, len(train_set), skipped, model, pipeline,
              torch.compile(train_module) if t.compile else train_module, optimizer,
              schedule.make_scheduler(optimizer, t, pipeline.steps_per_epoch), scaler, amp_dtype,
              schedule.EMA(model, t.ema) if t.ema is not None else None, make_mixer(t, len(classes)),
              unfused_attention_modules(model, device, amp_dtype),
              start_fingerprint, counts,
              probe and {"id": probe["id"], "val_acc": probe["val_acc"]})
    describe(run, setup, amp_why, rank_batch, synced_bn)
    return run


def describe(run: Run, setup: str, amp_why: str, rank_batch: int, synced_bn: bool) -> None:
    """How the run is set up, said once per command for every ingredient set up alike (a sweep of 16)."""
    w, t = distributed.world(), run.recipe.train
    lines = [setup, f"  data path: {run.pipeline.description}"]
    # The recipe's amp names a wish; say what this device makes of it, and why.
    precision = "fp32" if run.amp_dtype is None else f"{str(run.amp_dtype).removeprefix('torch.')} autocast"
    unfused = "; attention unfused in training steps (faster than the fused CPU kernel in bf16)" if run.unfused else ""
    lines.append(f"  precision: {precision}{' + grad scaler' if run.scaler.is_enabled() else ''} ({amp_why}){unfused}")
    if w.distributed:
        bn = ("BatchNorm synchronised across ranks" if synced_bn else
              "BatchNorm statistics per rank (no SyncBatchNorm on CPU)"
              if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.model.modules()) else "")
        lines.append(f"  data parallel: {w.size} processes x {rank_batch} images = global batch {t.batch_size}"
                     f" ({distributed.backend()}){'; ' + bn if bn else ''}")
    if first_time("set up " + "\n".join(lines)):
        for line in lines:
            run.console.print(line)


def identity(run: Run) -> dict:
    """What a saved state is stored with, and must match to be resumed: the recipe and the start."""
    return {"recipe": run.recipe.to_dict(), "start_fingerprint": run.start_fingerprint}


def resume_run(run: Run) -> None:
    state = resume_state(run.state_path, identity(run), run.model, run.optimizer, run.scaler, run.schedule)
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.history, run.first_epoch = state["history"], state["epoch"]
    run.console.print(f"  {run.ingredient.id}: resumed after epoch {run.first_epoch}")


def train_step(run: Run, inputs: torch.Tensor, targets: torch.Tensor, generator) -> torch.Tensor:
    """One optimizer step; returns the batch's loss, still on the device."""
    t, device = run.recipe.train, run.device
    if run.mixer is not None:
        if inputs.dim() != 4:
            raise SoupError(f"train.mixup/train.cutmix mix images, but the data path ({run.pipeline.description}) "
                            f"feeds {tuple(inputs.shape)} features; set model.freeze: 0 or train with --no-cache")
        inputs, targets = run.mixer(inputs, targets, generator)
    with (torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None),
          explicit_attention(run.unfused)):
        loss = classification_loss(run.step_model(inputs), targets, t.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if t.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], t.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.schedule.step()
    if run.ema is not None:
        run.ema.update()
    return loss.detach()


def diverged(run: Run, what: str, epoch: int, step: int, loss: bool = False) -> SoupError:
    """The NaN stop's line: what went wrong where, how to avoid it, and what is kept. `loss`: the forward's
    loss was non-finite (else an optimizer step failed, which the lr drives)."""
    kept = (f"its last good state (after epoch {epoch}) is kept in {run.state_path}"
            if epoch > run.first_epoch or run.state_path.exists() else "nothing was saved")
    if loss and epoch == 0 and step == 0:  # no weight was updated yet: the lr played no part, the inputs or start did
        advice = ("no weight had been updated yet, so train.lr is not the cause: check data.mean/data.std, the start "
                  "weights (model.weights, model.probe) and, under AMP, set train.amp=off")
    else:
        advice = ("lower train.lr or set train.amp=off; if it happens at any lr, check data.mean/data.std and the "
                  "start weights")
    return SoupError(f"{run.ingredient.id}: {what} at epoch {epoch + 1}, step {step + 1} "
                     f"(lr {run.optimizer.param_groups[-1]['lr']:g}, amp {run.recipe.train.amp}); {advice}; {kept}")


def read_losses(run: Run, losses: list[torch.Tensor], sizes: list[int], start: int, epoch: int) -> float:
    """The epoch's loss sum so far (each batch's mean loss x its size), in one read from the device; stops
    at a non-finite loss among steps `start`..."""
    values = torch.stack(losses).tolist() if losses else []
    bad = next((step for step in range(start, len(values)) if not math.isfinite(values[step])), None)
    if bad is not None:
        raise diverged(run, f"loss became {values[bad]}", epoch, bad, loss=True)
    return sum(value * n for value, n in zip(values, sizes))


def train_epoch(run: Run, epoch: int, progress: Progress) -> dict:
    """One epoch of training, then the val scores: the epoch's record in the history."""
    w, t = distributed.world(), run.recipe.train
    if w.distributed:
        # Per-rank streams (augmentation differs across ranks), drawn from (seed, rank, epoch) so a
        # resumed run is reproducible although state.pt holds rank 0's RNG state only.
        seed_everything((t.seed * 1_000_003 + w.rank * 10_007 + epoch) % 2**32)
    train_mode(run.model, run.recipe.model.freeze_bn)
    lr = run.optimizer.param_groups[-1]["lr"]  # the full-rate group's lr at the epoch's first step
    generator = mix_generator(t.seed, w.rank, epoch) if run.mixer is not None else None
    batches = progress.add_task(f"epoch {epoch + 1}", total=run.pipeline.steps_per_epoch, status="")
    started, losses, sizes, checked = time.perf_counter(), [], [], 0
    for step, (inputs, targets) in enumerate(run.pipeline.train_batches(epoch)):
        try:
            losses.append(train_step(run, inputs, targets, generator))
        except ValueError as err:
            if "more than 1 value per channel" not in str(err):
                raise
            raise SoupError(f"{run.ingredient.id}: epoch {epoch + 1}, step {step + 1} is a batch of one image, and a "
                            f"BatchNorm layer cannot train on one ({run.n_train} train images in batches of "
                            f"{t.batch_size}); choose another train.batch_size, add train images, or set "
                            "model.freeze_bn: true") from None
        except RuntimeError as err:  # e.g. AdamW's lr / bias correction overflowing float32: the run diverged
            if not DIVERGED.search(str(err)):
                raise  # out of memory, a bug: not the numbers
            raise diverged(run, f"the step failed ({str(err).splitlines()[0]})", epoch, step) from None
        sizes.append(len(targets))
        if (step + 1) % CHECK_EVERY == 0:
            mean = read_losses(run, losses, sizes, checked, epoch) / sum(sizes)
            checked = step + 1
            run.events.step(epoch, checked, mean, run.optimizer.param_groups[-1]["lr"])
            progress.update(batches, status=f"loss {mean:.3f}")
        progress.update(batches, advance=1)
    loss_sum = read_losses(run, losses, sizes, checked, epoch)
    seconds = time.perf_counter() - started
    progress.remove_task(batches)
    seen = sum(sizes)
    if w.distributed:
        seen, loss_sum = distributed.all_sum([seen, loss_sum], run.device)  # the global epoch's figures
        if seen != distributed.rank_count(run.n_train, w.size) * w.size:
            # A data path that does not shard feeds every rank the whole epoch: N times the work,
            # and DDP averaging over batches that are not the global ones.
            raise RuntimeError(f"data path {run.pipeline.description!r}: the ranks trained on {seen:.0f} "
                               f"images together, not one epoch of {run.n_train}; draw each rank's "
                               "order as distributed.rank_slice(epoch_order(...), rank, size)")
    val, raw = validate(run)
    record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "val_top1": val["top1"],
              "val_top5": val["top5"], "val_loss": val["loss"], "images_per_s": seen / seconds,
              "seconds": seconds}
    if raw is not None:
        record |= {"raw_val_top1": raw["top1"], "raw_val_top5": raw["top5"], "raw_val_loss": raw["loss"]}
    if not run.console.is_terminal and time.monotonic() - run.said_at >= HEARTBEAT_S:
        # No bar in a log file: a long run still says how it goes (a short one says it when it finishes).
        ema = f" (EMA; raw weights {raw['top1']:.2%})" if raw is not None else ""
        run.console.print(f"  {run.ingredient.id}: epoch {epoch + 1}/{t.epochs}  lr {lr:.2g}  train loss "
                          f"{loss_sum / seen:.3f}  val acc {val['top1']:.2%}{ema}  ({seen / seconds:,.0f} img/s)")
        run.said_at = time.monotonic()
    return record


def validate(run: Run) -> tuple[dict, dict | None]:
    """(scores of the weights the checkpoint will hold, scores of the raw trained weights when that is an
    EMA, else None). Rank 0 scores the whole val set and tells the others: all ranks hold the same
    weights, and the data path (and any cache of it) stays unsharded for val."""
    main = distributed.world().main
    raw = distributed.from_main(run.pipeline.evaluate() if main else None)
    if run.ema is None:
        return raw, None
    with run.ema.swapped():
        return distributed.from_main(run.pipeline.evaluate() if main else None), raw


def finish(run: Run) -> Path:
    """The checkpoint (the EMA's weights when there is one), metrics.json, and the state removed."""
    w, recipe, history, ingredient = distributed.world(), run.recipe, run.history, run.ingredient
    final = run.run_dir / INGREDIENT_FILE
    record = Record(
        kind=run.kind, name=recipe.name, id=ingredient.id, settings=ingredient.settings,
        recipe=recipe.to_dict(), data_root=str(Path(recipe.data.root).resolve()),  # where data.root led
        backbone=recipe.model.backbone, classes=run.classes, start=Start(run.start_fingerprint),
        seed=recipe.train.seed, history=history, val_acc=history[-1]["val_top1"],
        # The raw trained weights' accuracy: val_acc's own without an EMA.
        raw_val_acc=history[-1].get("raw_val_top1", history[-1]["val_top1"]),
        probe=Probe.parse(run.probe),  # the probed start: its id and val accuracy, or None
        pruned=prune.stopped(history),  # the rung decision that stopped it (search.prune), or None
        # The whole sweep, so that `soup cook` can name the ingredients not (yet) trained.
        sweep_ids=ingredient.sweep_ids or [ingredient.id],
        # How it ran, for metrics.json: in the checkpoint too, so that a resume can rebuild that file.
        run={**run.counts, "device": str(run.device), "amp": str(run.amp_dtype),
             "data_path": run.pipeline.description, "skipped_images": run.skipped, "processes": w.size})
    if w.main:
        # In this order; a kill between two steps leaves what is_finished() completes on --resume.
        with run.ema.swapped() if run.ema is not None else contextlib.nullcontext():
            save_checkpoint(final, run.model.state_dict(), record)
        write_metrics(run.run_dir, record)
        logs.finished(run.events, record, run.run_dir)  # hparams, and summary.csv with this row
        run.state_path.unlink(missing_ok=True)  # the checkpoint holds everything now; the state is large
    distributed.barrier()  # the other ranks return once the checkpoint they return exists
    return final
