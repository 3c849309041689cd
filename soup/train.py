"""Training: one ingredient per resolved recipe, read top to bottom."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from soup.backbones import build_model, fingerprint, freeze_prefix
from soup.checkpoint import INGREDIENT_FILE, read_checkpoint, save_checkpoint, write_text_atomic
from soup.data import class_list, load_split
from soup.errors import SoupError
from soup.evaluate import autocast_dtype, evaluate, make_loader, resolve_device
from soup.recipe import Ingredient, Recipe, expand_sweep


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


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), console=console, transient=True)


def train_ingredient(ingredient: Ingredient, out: str | Path = "checkpoints", console: Console | None = None) -> Path:
    """Fine-tune one ingredient; returns the path of its checkpoint."""
    console = console or Console()
    recipe, t = ingredient.recipe, ingredient.recipe.train
    run_dir = Path(out) / recipe.name / ingredient.id
    device = resolve_device(t.device)
    seed_everything(t.seed)

    classes = class_list(recipe.data.root)
    train_set = load_split(recipe.data, "train", train=True, classes=classes)
    val_set = load_split(recipe.data, "val", classes=classes)
    model = build_model(recipe.model, classes, recipe.data.image_size)
    start_fingerprint = fingerprint(model)
    frozen, backbone_total = freeze_prefix(model.backbone, recipe.model.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    console.print(f"[bold]{recipe.name}/{ingredient.id}[/]: {trainable:,} of {total:,} parameters train "
                  f"({frozen:,} of {backbone_total:,} backbone parameters frozen); {len(train_set)} train / "
                  f"{len(val_set)} val images, {len(classes)} classes, {device}")

    model.to(device)
    step_model = torch.compile(model) if t.compile else model
    optimizer = make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(recipe, epoch))
    amp_dtype = autocast_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    order = torch.Generator().manual_seed(t.seed)
    train_loader = make_loader(train_set, t.batch_size, t.num_workers, device, shuffle=True, generator=order)
    val_loader = make_loader(val_set, t.batch_size * 2, t.num_workers, device)

    history = []
    with _progress(console) as progress:
        epochs = progress.add_task("epochs", total=t.epochs, status="")
        for epoch in range(t.epochs):
            model.train()
            batches = progress.add_task(f"epoch {epoch + 1}", total=len(train_loader), status="")
            started, seen, loss_sum = time.perf_counter(), 0, 0.0
            for step, (images, targets) in enumerate(train_loader):
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = F.cross_entropy(step_model(images), targets)
                if not torch.isfinite(loss):
                    raise SoupError(
                        f"{ingredient.id}: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr {optimizer.param_groups[0]['lr']:g}, amp {t.amp}); lower train.lr or set "
                        "train.amp=off; nothing of this ingredient was saved")
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
            val = evaluate(model, val_loader, device)
            history.append({"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "val_top1": val["top1"],
                            "val_top5": val["top5"], "val_loss": val["loss"], "images_per_s": seen / seconds})
            console.print(f"  epoch {epoch + 1}/{t.epochs}  lr {lr:.2g}  train loss {loss_sum / seen:.3f}  "
                          f"val acc {val['top1']:.2%}  ({seen / seconds:,.0f} img/s)")
            progress.update(epochs, advance=1, status=f"val {val['top1']:.2%}")

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
    path = save_checkpoint(run_dir / INGREDIENT_FILE, model.state_dict(), meta)
    metrics = {k: meta[k] for k in ("name", "id", "settings", "seed", "backbone", "start_fingerprint",
                                    "val_acc", "val_history")}
    metrics.update(trainable_params=trainable, total_params=total, device=str(device), amp=str(amp_dtype))
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return path


def select_ingredients(recipe: Recipe, index: int | None) -> list[Ingredient]:
    ingredients = expand_sweep(recipe)
    if index is None:
        return ingredients
    if not 0 <= index < len(ingredients):
        raise SoupError(f"--ingredient {index}: the recipe's sweep has {len(ingredients)} ingredients "
                        f"(0 to {len(ingredients) - 1})")
    return [ingredients[index]]


def train_recipe(recipe: Recipe, out: str | Path = "checkpoints", index: int | None = None,
                 console: Console | None = None) -> list[tuple[Ingredient, Path]]:
    """Train every ingredient of a recipe's sweep (or just the `index`-th); returns their checkpoints."""
    console = console or Console()
    ingredients = select_ingredients(recipe, index)
    class_list(recipe.data.root)  # fail on a bad data folder before any model is built
    results = []
    for ingredient in ingredients:
        results.append((ingredient, train_ingredient(ingredient, out, console)))
    return results


def ingredient_table(name: str, results: list[tuple[Ingredient, Path]]) -> Table:
    table = Table(title=f"{name}: ingredients")
    for column in ("ingredient", "val acc", "checkpoint"):
        table.add_column(column, no_wrap=column != "checkpoint")
    for item, path in results:
        table.add_row(item.id, f"{read_checkpoint(path).meta['val_acc']:.2%}", str(path))
    return table
