"""Training: one ingredient per resolved recipe, read top to bottom.

Every epoch the full training state is saved atomically (`state.pt`), so a killed run resumes where it
was (`soup train --resume`) and ends with the same weights as an uninterrupted one: the data order of
each epoch depends only on (seed, epoch), and RNG states travel with the state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from soup.backbones import build_model, fingerprint, freeze_prefix
from soup.checkpoint import INGREDIENT_FILE, atomic_path, read_checkpoint, save_checkpoint, write_text_atomic
from soup.data import class_list, load_split
from soup.errors import Interrupted, SoupError
from soup.evaluate import autocast_dtype, evaluate, make_loader, resolve_device
from soup.recipe import Ingredient, Recipe, expand_sweep

STATE_FILE = "state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """Step schedule; epochs count from 1, so lr_drop_epoch 7 trains epochs 7, 8, ... at the lower rate."""
    drop = recipe.train.lr_drop_epoch
    return recipe.train.lr_drop_factor if drop is not None and epoch + 1 >= drop else 1.0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, so a resumed run sees the
    same batches as an uninterrupted one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class EpochSampler(Sampler[int]):
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.n


@dataclass
class Pipeline:
    """What the training loop feeds on. The plain pipeline decodes images every epoch; faster ones
    (decoded-image and frozen-prefix caches) plug in through `build_pipeline` with the same shape."""

    model: nn.Module  # forward(inputs) -> logits; shares its trainable parameters with the full model
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> batches on device
    evaluate: Callable[[], dict]  # val scores of the current weights
    steps_per_epoch: int
    description: str


def plain_pipeline(recipe: Recipe, model: nn.Module, train_set: Dataset, val_set: Dataset,
                   device: torch.device) -> Pipeline:
    t = recipe.train
    sampler = EpochSampler(len(train_set), t.seed)
    loader = DataLoader(train_set, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
                        pin_memory=device.type == "cuda")
    val_loader = make_loader(val_set, t.batch_size * 2, t.num_workers, device)

    def train_batches(epoch: int):
        sampler.epoch = epoch
        for images, targets in loader:
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    return Pipeline(model, train_batches, lambda: evaluate(model, val_loader, device), len(loader),
                    "plain: decode and resize every image every epoch")


def build_pipeline(recipe: Recipe, model: nn.Module, train_set: Dataset, val_set: Dataset,
                   device: torch.device, use_cache: bool = True) -> Pipeline:
    return plain_pipeline(recipe, model, train_set, val_set, device)


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


def save_state(path: Path, model, optimizer, scaler, schedule, epoch: int, history: list, meta: dict) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "schedule": schedule.state_dict(), "epoch": epoch, "history": history, "rng": _rng_state(),
             "meta": meta}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SoupError(f"{path}: cannot read the saved training state ({type(err).__name__}); delete it "
                        "to start this ingredient over") from None


@contextlib.contextmanager
def ingredient_lock(run_dir: Path):
    """One process per ingredient: a second `soup train --ingredient K` on the same folder stops at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SoupError(f"{run_dir}: another process is training this ingredient; wait for it or use "
                            "another --out") from None
        handle.write(str(os.getpid()))
        handle.flush()
        yield


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A preempted job gets SIGTERM: treat it as Ctrl-C, so the run stops cleanly."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    """Fine-tune one ingredient; returns the path of its checkpoint."""
    console = console or Console()
    recipe, t = ingredient.recipe, ingredient.recipe.train
    run_dir = Path(out) / recipe.name / ingredient.id
    final, state_path = run_dir / INGREDIENT_FILE, run_dir / STATE_FILE
    if final.exists():
        if resume:
            console.print(f"[bold]{recipe.name}/{ingredient.id}[/]: finished already, skipped")
            return final
        raise SoupError(f"{final} exists: this ingredient is trained; use --resume to skip finished "
                        "ingredients, or another --out")
    if state_path.exists() and not resume:
        raise SoupError(f"{state_path} holds an unfinished run of this ingredient; add --resume to continue "
                        "it, or delete it to start over")
    device = resolve_device(t.device)
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]{recipe.name}/{ingredient.id}[/]: {trainable:,} of {total:,} parameters train "
                  f"({frozen:,} of {backbone_total:,} backbone parameters frozen); {len(train_set)} train / "
                  f"{len(val_set)} val images, {len(classes)} classes, {device}")

    model.to(device)
    optimizer = make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(recipe, epoch))
    amp_dtype = autocast_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    pipeline = build_pipeline(recipe, model, train_set, val_set, device, use_cache)
    step_model = torch.compile(pipeline.model) if t.compile else pipeline.model
    console.print(f"  data path: {pipeline.description}")

    meta = {"recipe": recipe.to_dict(), "start_fingerprint": start_fingerprint}
    history, first_epoch = [], 0
    if resume and state_path.exists():
        state = load_state(state_path)
        if state["meta"] != meta:
            raise SoupError(f"{state_path} was saved by a different recipe or start; delete it to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        schedule.load_state_dict(state["schedule"])
        history, first_epoch = state["history"], state["epoch"]
        _set_rng_state(state["rng"])
        console.print(f"  resumed after epoch {first_epoch}")

    saved_epochs = [first_epoch]
    with (resume_hint_on_interrupt(ingredient.id, saved_epochs), ingredient_lock(run_dir),
          sigterm_as_interrupt(), _progress(console) as progress):
        epochs = progress.add_task("epochs", total=t.epochs, completed=first_epoch, status="")
        for epoch in range(first_epoch, t.epochs):
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
            lr = optimizer.param_groups[0]["lr"]
            schedule.step()
            val = pipeline.evaluate()
            history.append({"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "val_top1": val["top1"],
                            "val_top5": val["top5"], "val_loss": val["loss"], "images_per_s": seen / seconds})
            console.print(f"  epoch {epoch + 1}/{t.epochs}  lr {lr:.2g}  train loss {loss_sum / seen:.3f}  "
                          f"val acc {val['top1']:.2%}  ({seen / seconds:,.0f} img/s)")
            progress.update(epochs, advance=1, status=f"val {val['top1']:.2%}")
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
        }
        save_checkpoint(final, model.state_dict(), meta)
        metrics = {k: meta[k] for k in ("name", "id", "settings", "seed", "backbone", "start_fingerprint",
                                        "val_acc", "val_history")}
        metrics.update(trainable_params=trainable, total_params=total, device=str(device), amp=str(amp_dtype),
                       data_path=pipeline.description, skipped_images=skipped)
        write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        state_path.unlink(missing_ok=True)  # the checkpoint holds everything now; the state is large
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
    return [(ingredient, train_ingredient(ingredient, out, console, resume, use_cache))
            for ingredient in ingredients]


def ingredient_table(name: str, results: list[tuple[Ingredient, Path]]) -> Table:
    table = Table(title=f"{name}: ingredients")
    for column in ("ingredient", "val acc", "checkpoint"):
        table.add_column(column, no_wrap=column != "checkpoint")
    for item, path in results:
        table.add_row(item.id, f"{read_checkpoint(path).meta['val_acc']:.2%}", str(path))
    return table
