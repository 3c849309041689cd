"""Training speed: the seed-style loop vs soup's own path, in one process, same device, data and epochs.

    python benchmarks/train_speed.py              # CPU: small DinoV2-architecture ViT on generated sketches
    python benchmarks/train_speed.py --sweep 8    # a whole sweep (soup shares its caches across ingredients)
    python benchmarks/train_speed.py --augment randaugment [--sweep 8]
                                                  # random augmentation: PIL transforms in the DataLoader vs
                                                  #   soup's decode-once + augment-on-the-device path
    python benchmarks/train_speed.py              # on a GPU: ViT-B/14 architecture (random weights), 224 px,
                                                  #   500 classes
    python benchmarks/train_speed.py --arch swin  # CPU: SwinV2-B's layout shrunk in width, 128 px
    python benchmarks/train_speed.py --arch swinv2b   # SwinV2-B (recipes/swinv2_base.yaml's), 256 px

Seed-style: torchvision ImageFolder + PIL transforms (with --augment, the recipe's augmentation as
soup.data.folders.build_transform makes it, e.g. RandAugment) through a DataLoader every epoch, full forward of the
partly frozen model, fp16 autocast + GradScaler where the device has it (CUDA), a val pass every epoch.
Soup: `soup.train.sweep.train_recipe` as `soup train` runs it (caches built from scratch inside the timing, a
val pass every epoch, checkpoints written). img/s counts training images (epochs x train images x
ingredients) over the whole wall time of each path. The last lines are `speedup: X.XX` and `bound: X.XX`,
the compute bound of the frozen split measured: (full forward + suffix backward) / (suffix forward +
suffix backward), from the model's own FLOP counts (torch.utils.flop_counter) for one training step. It
counts model arithmetic only: a speedup above it comes from work outside the model (decoding every
epoch, full-model val passes), one below it from fixed costs and kernels that do not scale with FLOPs.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from soup.data.folders import build_transform, class_list, load_split  # noqa: E402
from soup.data.sketches import generate_sketches  # noqa: E402
from soup.fast import decoded as fast_decoded, prefix as fast_prefix  # noqa: E402
from soup.fast.prefix import SuffixModel, find_prefix  # noqa: E402
from soup.models.backbones import build_model, freeze_prefix  # noqa: E402
from soup.models.precision import cpu_flags_line  # noqa: E402
from soup.recipe.spec import AUGMENTS, recipe_from_dict  # noqa: E402
from soup.train.sweep import train_recipe  # noqa: E402

ARCHS = {
    # DinoV2's ViT (timm's port of it), shrunk in width only: 12 blocks, so freeze 0.75 caches 9 of them.
    "small": dict(backbone="timm:vit_small_patch14_dinov2", kwargs=dict(embed_dim=192, num_heads=3)),
    "vitb": dict(backbone="timm:vit_base_patch14_dinov2", kwargs={}),
    # SwinV2-B's layout (stages of 2, 2, 18 and 2 blocks), shrunk in width to 32-256 at 128 px: freeze 0.75
    # cuts after the last stage's patch merging, as in recipes/swinv2_base.yaml's real model (25 of 27 units
    # cached). No drop-path, as in that recipe, so the frozen part can be cached.
    "swin": dict(backbone="timm:swinv2_base_window12to16_192to256", image_size=128,
                 kwargs=dict(embed_dim=32, num_heads=[1, 2, 4, 8], window_size=8, drop_path_rate=0.0)),
    "swinv2b": dict(backbone="timm:swinv2_base_window12to16_192to256", image_size=256,
                    kwargs=dict(drop_path_rate=0.0)),
}


def make_data(root: Path, classes: int, train_per_class: int, val_per_class: int, page: int,
              test_images: int = 4) -> Path:
    """Sketches in the course layout; more than 16 classes are made by dealing the images of 16 shape
    classes into `classes` folders (content matters little for speed, decoding and size do)."""
    marker = root / f".bench-{classes}-{train_per_class}-{val_per_class}-{page}-{test_images}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shapes = min(classes, 16)
    raw = root / "raw" if classes > 16 else root
    per_shape = math.ceil(classes / shapes)
    generate_sketches(raw, shapes, train_per_class * per_shape, val_per_class * per_shape, test_images, page, seed=0)
    if classes > 16:
        for split in ("train_images", "val_images"):
            files = sorted((raw / split).rglob("*.*"))
            for i, file in enumerate(files):
                folder = root / split / f"class{i % classes:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                os.link(file, folder / f"{i:06d}{file.suffix}")
        shutil.move(str(raw / "test_images"), str(root / "test_images"))
        shutil.rmtree(raw)
    marker.touch()
    return root


def recipe_for(args, root: Path, sweep: int) -> dict:
    arch = ARCHS[args.arch]
    return {
        "name": "bench",
        "data": {"root": str(root), "image_size": args.image_size, "augment": args.augment},
        "model": {"backbone": arch["backbone"], "pretrained": False, "freeze": args.freeze,
                  "kwargs": {"img_size": args.image_size, **arch["kwargs"]}},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "sgd", "lr": 5e-3,
                  "momentum": 0.9, "lr_drop_epoch": max(1, round(0.7 * args.epochs)), "amp": args.amp,
                  "num_workers": args.workers, "device": str(args.device), "compile": args.compile},
        "sweep": {"train.seed": list(range(sweep))} if sweep > 1 else {},
    }


def seed_style(recipe, device: torch.device, seed: int) -> tuple[float, int]:
    """One ingredient the way the seed code trained it; returns (seconds, training images seen)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    d, t = recipe.data, recipe.train
    # Resize + normalise, with the recipe's random augmentation for training done the seed's way: PIL, per
    # image, in the loader.
    train = ImageFolder(str(Path(d.root) / "train_images"), build_transform(d, train=True))
    val = ImageFolder(str(Path(d.root) / "val_images"), build_transform(d))
    cuda = device.type == "cuda"
    loader = DataLoader(train, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers, pin_memory=cuda)
    val_loader = DataLoader(val, batch_size=t.batch_size * 2, num_workers=t.num_workers, pin_memory=cuda)
    model = build_model(recipe.model, train.classes, d.image_size)
    freeze_prefix(model.backbone, recipe.model.freeze)
    model.to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=t.lr, momentum=t.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    seen = 0
    for epoch in range(t.epochs):
        model.train()
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(targets)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in val_loader)
        print(f"  seed-style epoch {epoch + 1}: loss {loss.item():.3f}, val acc {correct / len(val):.2%}",
              flush=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, seen


def soup_path(raw_recipe: dict, out: Path, console: Console) -> tuple[float, int]:
    recipe = recipe_from_dict(raw_recipe)
    # Cold caches: the cost of building them is part of what soup's path costs.
    shutil.rmtree(Path(recipe.data.root) / ".soup_cache", ignore_errors=True)
    fast_decoded._DECODED.clear()
    fast_prefix._FEATURES.clear()
    started = time.perf_counter()
    results = train_recipe(recipe, out, console=console)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    n_train = len(load_split(recipe.data, "train", classes=class_list(recipe.data.root)))
    return seconds, n_train * recipe.train.epochs * len(results)


def _flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def compute_bound(recipe, classes: int) -> tuple[float | None, str]:
    """(seed-style FLOPs / soup FLOPs per training step, what it counts): seed-style runs the whole model
    forward and back-propagates through the trained part; soup's prefix path runs the trained part only.
    None where soup's training cannot use the prefix cache (then both run the same model arithmetic)."""
    model = build_model(recipe.model, [str(i) for i in range(classes)], recipe.data.image_size)
    freeze_prefix(model.backbone, recipe.model.freeze)
    split, why = find_prefix(model.backbone, recipe.data.image_size)
    if split is None or recipe.data.augment != "none":
        return None, why or f"data.augment {recipe.data.augment}: training runs the whole model on both paths"
    images = torch.randn(2, 3, recipe.data.image_size, recipe.data.image_size)
    suffix = SuffixModel(model, split)
    with torch.no_grad():
        tokens = split.prefix(images)
        full_forward = _flops(lambda: model(images))
        suffix_forward = _flops(lambda: suffix(tokens))
    suffix_both = _flops(lambda: suffix(tokens).sum().backward())
    seed = full_forward + suffix_both - suffix_forward
    return seed / suffix_both, (f"(full forward {full_forward / 2:.3g} + suffix backward "
                                f"{(suffix_both - suffix_forward) / 2:.3g}) / (suffix forward + backward "
                                f"{suffix_both / 2:.3g}) FLOPs per image; trained: {split.rest_text()}")


def shape_arguments(description: str, archs, train_per_class_cpu: int, amp: str) -> argparse.ArgumentParser:
    """A parser holding the flags every ViT-B-shaped benchmark shares: on a GPU the course's shape (ViT-B/14
    at 224 px, 500 classes, freeze 0.75), on a CPU a small one that runs in minutes."""
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--arch", choices=archs, default="vitb" if gpu else "small")
    parser.add_argument("--image-size", type=int, default=224 if gpu else 112)
    parser.add_argument("--classes", type=int, default=500 if gpu else 8)
    parser.add_argument("--train-per-class", type=int, default=20 if gpu else train_per_class_cpu)
    parser.add_argument("--val-per-class", type=int, default=4 if gpu else 10)
    parser.add_argument("--page", type=int, default=256 if gpu else 160, help="smallest source image side (px)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--freeze", type=float, default=0.75)
    parser.add_argument("--amp", default=amp, choices=["fp16", "bf16", "off"])
    # On a 2-core machine, worker processes only fight the main process for the cores.
    parser.add_argument("--workers", type=int, default=0 if (os.cpu_count() or 1) <= 2 else min(16, os.cpu_count()))
    return parser


def main() -> None:
    parser = shape_arguments(__doc__.split("\n\n")[0], ARCHS, 60, "fp16")
    parser.add_argument("--compile", action="store_true", help="train.compile: true for soup's path")
    parser.add_argument("--augment", choices=AUGMENTS, default="none",
                        help="data.augment for both paths (seed-style: PIL transforms in the DataLoader)")
    parser.add_argument("--sweep", type=int, default=1, help="ingredients (seeds) in soup's run")
    parser.add_argument("--seed-runs", type=int, default=1,
                        help="ingredients the seed-style loop really trains; the rest is extrapolated "
                             "(it shares nothing between ingredients, so its cost is linear)")
    parser.add_argument("--data", type=Path, default=None, help="data folder (generated once, reused)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure both paths this many times, alternating, and keep each one's fastest "
                             "(for shared machines)")
    parser.set_defaults(image_size=None)  # the architecture's own where it has one (SwinV2: fixed input size)
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.image_size is None:
        args.image_size = ARCHS[args.arch].get("image_size", 224 if args.device.type == "cuda" else 112)

    root = args.data or Path(tempfile.gettempdir()) / f"soup_bench_{args.arch}_{args.image_size}"
    make_data(root, args.classes, args.train_per_class, args.val_per_class, args.page)
    raw = recipe_for(args, root, args.sweep)
    recipe = recipe_from_dict({**raw, "sweep": {}})
    name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
            else f"CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}; {cpu_flags_line()})")
    print(f"device: {name}; torch {torch.__version__}; {raw['model']['backbone']} {raw['model']['kwargs']}, "
          f"freeze {args.freeze}; {args.classes} classes; {args.epochs} epochs x batch {args.batch_size}; "
          f"amp {args.amp}; workers {args.workers}; augment {args.augment}; ingredients {args.sweep}", flush=True)

    runs = max(1, min(args.seed_runs, args.sweep))
    extrapolated = f" (measured {runs} of {args.sweep} ingredients)" if runs < args.sweep else ""
    seed_rate = soup_rate = 0.0
    for attempt in range(args.repeat):
        seed_seconds, seed_images = 0.0, 0
        cpu = time.process_time()
        for seed in range(runs):
            seconds, images = seed_style(recipe, args.device, seed)
            seed_seconds, seed_images = seed_seconds + seconds, seed_images + images
        cpu, seed_cpu = time.process_time(), time.process_time() - cpu
        # CPU seconds of this process (all its threads): what a machine shared with other jobs disturbs least.
        print(f"seed-style: {seed_images} images in {seed_seconds:.1f} s = {seed_images / seed_seconds:,.0f} img/s"
              f"{extrapolated}; {seed_cpu:.1f} CPU s", flush=True)
        with tempfile.TemporaryDirectory() as out:
            soup_seconds, soup_images = soup_path(raw, Path(out), Console(highlight=False))
        soup_cpu = time.process_time() - cpu
        print(f"soup: {soup_images} images in {soup_seconds:.1f} s = {soup_images / soup_seconds:,.0f} img/s "
              f"({args.sweep} ingredient{'s' if args.sweep > 1 else ''}); {soup_cpu:.1f} CPU s; "
              f"CPU-time speedup {seed_cpu * soup_images / seed_images / soup_cpu:.2f}", flush=True)
        seed_rate = max(seed_rate, seed_images / seed_seconds)
        soup_rate = max(soup_rate, soup_images / soup_seconds)
    if args.repeat > 1:
        print(f"best of {args.repeat}: seed-style {seed_rate:,.0f} img/s, soup {soup_rate:,.0f} img/s")
    print(f"speedup: {soup_rate / seed_rate:.2f}")
    bound, counted = compute_bound(recipe, args.classes)
    print(f"bound: {bound:.2f} {counted}" if bound is not None else f"bound: none ({counted})")


if __name__ == "__main__":
    main()
