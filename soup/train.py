"""Training: one ingredient per resolved recipe, read top to bottom.

Every epoch the full training state is saved atomically (`state.pt`), so a killed run resumes where it
was (`soup train --resume`) and ends with the same weights as an uninterrupted one: the data order of
each epoch depends only on (seed, epoch), and RNG states travel with the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.utils.data import Dataset

from soup import distributed
from soup.backbones import build_model, fingerprint, freeze_prefix
from soup.checkpoint import (INGREDIENT_FILE, TEMP_SUFFIX, atomic_path, read_checkpoint, save_checkpoint,
                             write_text_atomic)
from soup.data import class_list, load_split
from soup.errors import Interrupted, SoupError, interrupt_on_signals
from soup.fast.build import build_pipeline
from soup.inference import resolve_device
from soup.pipeline import Pipeline, plain_pipeline
from soup.precision import choose_autocast
from soup.recipe import Ingredient, Recipe, expand_sweep

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
# What metrics.json shows of a checkpoint's metadata, followed by the facts of the run (meta["run"]).
METRICS_KEYS = ("name", "id", "settings", "seed", "backbone", "start_fingerprint", "val_acc", "val_history")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    t = recipe.train
    params = list(params)
    # One fused kernel per step instead of a loop over tensors; only where every tensor is on a GPU.
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused)


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """Step schedule; epochs count from 1, so lr_drop_epoch 7 trains epochs 7, 8, ... at the lower rate."""
    drop = recipe.train.lr_drop_epoch
    return recipe.train.lr_drop_factor if drop is not None and epoch + 1 >= drop else 1.0


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), console=console, transient=True)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def save_state(path: Path, model, optimizer, scaler, schedule, epoch: int, history: list, meta: dict) -> None:
    # Frozen tensors never change and a resume rebuilds them from the same start (the fingerprint in
    # `meta` is checked), so the state holds only what trains: a quarter of ViT-B/14 at freeze 0.75.
    frozen = frozen_names(model)
    changing = {k: v for k, v in model.state_dict().items() if k not in frozen}
    state = {"model": changing, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "schedule": schedule.state_dict(), "epoch": epoch, "history": history, "rng": _rng_state(),
             "meta": meta}
    # Through a file object: torch.save then reports a failed write (disk full) as that OSError's context.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SoupError(f"{path}: cannot read the saved training state ({type(err).__name__}); delete it "
                        "to start this ingredient over") from None


@contextlib.contextmanager
def ingredient_lock(run_dir: Path):
    """One process per ingredient: a second `soup train --ingredient K` on the same folder stops at once."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "w")
    except OSError as err:
        raise SoupError(f"cannot write {run_dir}: {err.strerror or err}; choose a writable --out") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
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


def train_ingredient(ingredient: Ingredient, out: str | Path = "checkpoints", console: Console | None = None,
                     resume: bool = False, use_cache: bool = True) -> Path:
    """Fine-tune one ingredient; returns the path of its checkpoint.

    Under torchrun (inside `distributed.session`, which `train_recipe` opens) every rank runs this with
    DDP on its share of each global batch; rank 0 alone prints and writes files."""
    w = distributed.world()
    if w.distributed and not distributed.initialized():
        raise RuntimeError("train_ingredient under torchrun needs a process group: call it inside "
                           "soup.distributed.session() (train_recipe does)")
    console = console or Console()
    if not w.main:
        console = Console(quiet=True)  # N processes, one voice: rank 0's
    run_dir = Path(out) / ingredient.recipe.name / ingredient.id
    # Lock first, then look: a process that looked first could see "unfinished", build its model while
    # another one finishes, then take the lock and train again over that checkpoint. Rank 0 holds the lock
    # for the whole group: the other ranks would find it taken.
    with ingredient_lock(run_dir) if w.main else contextlib.nullcontext():
        if w.main:
            remove_stale_temps(run_dir)
        if is_finished(ingredient, run_dir, resume, console, w.main):
            return run_dir / INGREDIENT_FILE
        return _train_locked(ingredient, run_dir, console, resume, use_cache)


def remove_stale_temps(run_dir: Path) -> None:
    """Temporary files (states, checkpoints) of a run killed while writing: whoever holds the ingredient's
    lock is the only writer in its folder, so none of them is being written now."""
    for stale in run_dir.glob(f".*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def write_metrics(run_dir: Path, meta: dict) -> None:
    """metrics.json, the readable summary of a checkpoint's metadata (and so rebuilt from it when needed)."""
    metrics = {k: meta[k] for k in METRICS_KEYS if k in meta} | meta.get("run", {})
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")


def is_finished(ingredient: Ingredient, run_dir: Path, resume: bool, console: Console, main: bool = True) -> bool:
    """Whether the ingredient is trained (with --resume; without, a trained or started one is refused).
    Finishing is idempotent: what a kill right after the checkpoint's rename left undone (metrics.json,
    removing the state) is done here, by the lock holder."""
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
    if checkpoint.meta.get("recipe") != recipe.to_dict():
        raise SoupError(f"{final} was trained from a different version of this recipe; rename the recipe "
                        "(name:) or use another --out, or delete that ingredient to retrain it")
    completed = []
    if main and not (run_dir / METRICS_FILE).exists():
        write_metrics(run_dir, checkpoint.meta)
        completed.append(f"wrote the missing {METRICS_FILE}")
    if main and state_path.exists():
        state_path.unlink()
        completed.append(f"removed the stale {STATE_FILE}")
    done = f" ({'; '.join(completed)})" if completed else ""
    console.print(f"[bold]{recipe.name}/{ingredient.id}[/]: finished already, skipped{done}")
    return True


def _train_locked(ingredient: Ingredient, run_dir: Path, console: Console, resume: bool, use_cache: bool) -> Path:
    w = distributed.world()
    recipe, t = ingredient.recipe, ingredient.recipe.train
    final, state_path = run_dir / INGREDIENT_FILE, run_dir / STATE_FILE
    device = distributed.rank_device(resolve_device(t.device), w)
    rank_batch = distributed.per_rank_batch(t.batch_size, w)
    seed_everything(t.seed)

    classes = class_list(recipe.data.root)
    train_set = load_split(recipe.data, "train", train=True, classes=classes)
    val_set = load_split(recipe.data, "val", classes=classes)
    skipped = train_set.skipped + val_set.skipped
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable images[/] (data.skip_bad_images), e.g. {skipped[0]}")
    model = build_model(recipe.model, classes, recipe.data.image_size)
    start_fingerprint = fingerprint(model)
    frozen, backbone_total = freeze_prefix(model.backbone, recipe.model.freeze)
    model, synced_bn = distributed.sync_batchnorm(model, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]{recipe.name}/{ingredient.id}[/]: {trainable:,} of {total:,} parameters train "
                  f"({frozen:,} of {backbone_total:,} backbone parameters frozen); {len(train_set)} train / "
                  f"{len(val_set)} val images, {len(classes)} classes, {device}")

    model.to(device)
    optimizer = make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(recipe, epoch))
    amp_dtype, amp_why = choose_autocast(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # Each rank's pipeline batches its share of the global batch; checkpoints keep the recipe as written.
    rank_recipe = (dataclasses.replace(recipe, train=dataclasses.replace(t, batch_size=rank_batch))
                   if w.distributed else recipe)
    pipeline = build_pipeline(rank_recipe, model, train_set, val_set, device, use_cache)
    train_module = distributed.wrap(pipeline.model, device)  # DDP for the step only; saves use `model`
    step_model = torch.compile(train_module) if t.compile else train_module
    console.print(f"  data path: {pipeline.description}")
    # The recipe's amp names a wish; say what this device makes of it, and why.
    precision = "fp32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"
    console.print(f"  precision: {precision}{' + grad scaler' if scaler.is_enabled() else ''} ({amp_why})")
    if w.distributed:
        bn = ("BatchNorm synchronised across ranks" if synced_bn else
              "BatchNorm statistics per rank (no SyncBatchNorm on CPU)"
              if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else "")
        console.print(f"  data parallel: {w.size} processes x {rank_batch} images = global batch {t.batch_size}"
                      f" ({distributed.backend()}){'; ' + bn if bn else ''}")

    meta = {"recipe": recipe.to_dict(), "start_fingerprint": start_fingerprint}
    history, first_epoch = [], 0
    if resume and state_path.exists():
        state = load_state(state_path)
        if state["meta"] != meta:
            raise SoupError(f"{state_path} was saved by a different recipe or start; delete it to start over")
        result = model.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys or set(result.missing_keys) != frozen_names(model):
            raise SoupError(f"{state_path} does not fit this model (freeze or architecture changed); delete it "
                            "to start over")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        schedule.load_state_dict(state["schedule"])
        history, first_epoch = state["history"], state["epoch"]
        _set_rng_state(state["rng"])
        console.print(f"  resumed after epoch {first_epoch}")

    saved_epochs = [first_epoch]
    with (resume_hint_on_interrupt(ingredient.id, saved_epochs), interrupt_on_signals(),
          _progress(console) as progress):
        epochs = progress.add_task("epochs", total=t.epochs, completed=first_epoch, status="")
        for epoch in range(first_epoch, t.epochs):
            if w.distributed:
                # Per-rank streams (augmentation differs across ranks), drawn from (seed, rank, epoch) so a
                # resumed run is reproducible although state.pt holds rank 0's RNG state only.
                seed_everything((t.seed * 1_000_003 + w.rank * 10_007 + epoch) % 2**32)
            model.train()
            batches = progress.add_task(f"epoch {epoch + 1}", total=pipeline.steps_per_epoch, status="")
            started, seen, loss_sum = time.perf_counter(), 0, 0.0
            for step, (inputs, targets) in enumerate(pipeline.train_batches(epoch)):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = F.cross_entropy(step_model(inputs), targets)
                if not torch.isfinite(loss):
                    kept = (f"its last good state (after epoch {epoch}) is kept in {state_path}"
                            if epoch > first_epoch or state_path.exists() else "nothing was saved")
                    raise SoupError(
                        f"{ingredient.id}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr {optimizer.param_groups[0]['lr']:g}, amp {t.amp}); lower train.lr or set "
                        f"train.amp=off; {kept}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(targets)
                loss_sum += loss.item() * len(targets)
                progress.update(batches, advance=1, status=f"loss {loss_sum / seen:.3f}")
            seconds = time.perf_counter() - started
            progress.remove_task(batches)
            if w.distributed:
                seen, loss_sum = distributed.all_sum([seen, loss_sum], device)  # the global epoch's figures
                if seen != distributed.rank_count(len(train_set), w.size) * w.size:
                    # A data path that does not shard feeds every rank the whole epoch: N times the work,
                    # and DDP averaging over batches that are not the global ones.
                    raise RuntimeError(f"data path {pipeline.description!r}: the ranks trained on {seen:.0f} "
                                       f"images together, not one epoch of {len(train_set)}; draw each rank's "
                                       "order as distributed.rank_slice(epoch_order(...), rank, size)")
            lr = optimizer.param_groups[0]["lr"]
            schedule.step()
            # Rank 0 scores the whole val set and tells the others: all ranks hold the same weights, and
            # the data path (and any cache of it) stays unsharded for val.
            val = distributed.from_main(pipeline.evaluate() if w.main else None)
            history.append({"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "val_top1": val["top1"],
                            "val_top5": val["top5"], "val_loss": val["loss"], "images_per_s": seen / seconds})
            console.print(f"  epoch {epoch + 1}/{t.epochs}  lr {lr:.2g}  train loss {loss_sum / seen:.3f}  "
                          f"val acc {val['top1']:.2%}  ({seen / seconds:,.0f} img/s)")
            progress.update(epochs, advance=1, status=f"val {val['top1']:.2%}")
            if w.main:
                save_state(state_path, model, optimizer, scaler, schedule, epoch + 1, history, meta)
            saved_epochs[0] = epoch + 1

        meta = {
            "kind": "ingredient",
            "name": recipe.name,
            "id": ingredient.id,
            "settings": ingredient.settings,
            "recipe": recipe.to_dict(),
            "backbone": recipe.model.backbone,
            "classes": classes,
            "start_fingerprint": start_fingerprint,
            "seed": t.seed,
            "val_history": history,
            "val_acc": history[-1]["val_top1"],
            # The whole sweep, so that `soup cook` can name the ingredients not (yet) trained.
            "sweep_ids": ingredient.sweep_ids or [ingredient.id],
            # How it ran, for metrics.json: in the checkpoint too, so that a resume can rebuild that file.
            "run": {"trainable_params": trainable, "total_params": total, "device": str(device),
                    "amp": str(amp_dtype), "data_path": pipeline.description, "skipped_images": skipped,
                    "processes": w.size},
        }
        if w.main:
            # In this order; a kill between two steps leaves what is_finished() completes on --resume.
            save_checkpoint(final, model.state_dict(), meta)
            write_metrics(run_dir, meta)
            state_path.unlink(missing_ok=True)  # the checkpoint holds everything now; the state is large
        distributed.barrier()  # the other ranks return once the checkpoint they return exists
    return final


def select_ingredients(recipe: Recipe, index: int | None) -> list[Ingredient]:
    ingredients = expand_sweep(recipe)
    if index is None:
        return ingredients
    if not 0 <= index < len(ingredients):
        raise SoupError(f"--ingredient {index}: the recipe's sweep has {len(ingredients)} ingredients "
                        f"(0 to {len(ingredients) - 1})")
    return [ingredients[index]]


def train_recipe(recipe: Recipe, out: str | Path = "checkpoints", index: int | None = None,
                 console: Console | None = None, resume: bool = False,
                 use_cache: bool = True) -> list[tuple[Ingredient, Path]]:
    """Train every ingredient of a recipe's sweep (or just the `index`-th); returns their checkpoints."""
    console = console or Console()
    ingredients = select_ingredients(recipe, index)
    class_list(recipe.data.root)  # fail on a bad data folder before any model is built
    # Under torchrun one process group serves the whole sweep (nccl on CUDA, gloo on CPU); else a no-op.
    with distributed.session(resolve_device(ingredients[0].recipe.train.device)):
        return [(ingredient, train_ingredient(ingredient, out, console, resume, use_cache))
                for ingredient in ingredients]


def ingredient_table(name: str, results: list[tuple[Ingredient, Path]]) -> Table:
    table = Table(title=f"{name}: ingredients")
    for column in ("ingredient", "val acc", "checkpoint"):
        table.add_column(column, no_wrap=column != "checkpoint")
    for item, path in results:
        table.add_row(item.id, f"{read_checkpoint(path).meta['val_acc']:.2%}", str(path))
    return table
