"""Pretrain the start soup ships (soup/assets/glyph_vit.safetensors): DinoV2's ViT architecture (timm
`vit_small_patch14_dinov2`: its blocks, LayerScale and class token, built small through kwargs) trained from
scratch to tell apart the procedural stroke characters of soup/data/glyphs.py, on the CPU, from a seed.

    python benchmarks/pretrain_start.py                      # rebuild the shipped file (about 48 min, one core)
    python benchmarks/pretrain_start.py --out /tmp/x.safetensors --epochs 1 --classes 50   # a quick look

Deterministic: fixed threads, torch's deterministic algorithms, every random draw from the seed (data,
initial weights, batch order, shifts), fp32 throughout. The same arguments, torch version and thread count
rebuild the same bytes; the provenance JSON written beside the weights records them with the file's
sha256, the accuracy reached on the glyphs' own val split (drawn apart from train) and the time taken.
The file holds timm's keys: the backbone and its glyph classifier (`head.*`, kept so that the recorded val
accuracy can be recomputed from the file; soup drops a timm model's classifier when it loads a start). soup
fine-tunes it by recipe: `model.backbone: timm:vit_small_patch14_dinov2`, `model.kwargs` as recorded,
`model.weights: <file>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soup.data.glyphs import generate_glyphs  # noqa: E402
from soup.models.files import atomic_path, write_text_atomic  # noqa: E402

ARCH = "vit_small_patch14_dinov2"
ASSET = Path(__file__).resolve().parents[1] / "soup" / "assets" / "glyph_vit.safetensors"
# The normalisation soup's recipes apply by default (data.mean / data.std): the start sees what fine-tuning
# feeds it, a grey page as three equal channels each normalised with its own mean and std.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSET, help="weights file; its provenance goes beside it (.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--per-class", type=int, default=64, help="train pages per class")
    p.add_argument("--val-per-class", type=int, default=6)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    # DinoV2 starts LayerScale at 1e-5 for 40 blocks trained for 625k steps; a shallow net trained briefly
    # learns at 0.1 (CaiT's value for depth <= 18). Same architecture: only the initial value differs.
    p.add_argument("--init-values", type=float, default=0.1, help="LayerScale's initial value")
    # 60 epochs, chosen on the glyphs' own val split: 10 ended at 50.1% (still rising), 30 at 94.8%, 60 at 96.3%.
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=2, help="random shift in pixels (augmentation)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="a pilot: stop after this many minutes (the schedule still spans --epochs)")
    return p.parse_args(argv)


def model_kwargs(args) -> dict:
    """What a recipe's model.kwargs must hold to rebuild the backbone (recorded in the provenance)."""
    return {"img_size": args.image_size, "patch_size": args.patch_size, "embed_dim": args.width,
            "depth": args.depth, "num_heads": args.heads, "init_values": args.init_values}


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).unsqueeze(1)  # uint8 (n, 1, size, size)


def prepare(batch: torch.Tensor) -> torch.Tensor:
    """uint8 grey pages -> normalised 3-channel floats, as soup feeds an RGB page of grey pixels."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (batch.float().expand(-1, 3, -1, -1) / 255 - mean) / std


def shifted(batch: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each page moved by up to `shift` pixels each way, edges repeated (the paper continues)."""
    if shift == 0:
        return batch
    size = batch.shape[-1]
    padded = F.pad(batch.float(), (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (batch.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = sum(int((model(prepare(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    model.train()
    return correct / len(images)


def pretrain(args, log=lambda line: print(line, flush=True)) -> tuple[dict[str, torch.Tensor], dict]:
    """Train from the seed; returns the model's state and what the run reached."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    train = generate_glyphs(args.classes, args.per_class, args.image_size, args.seed, "train")
    val = generate_glyphs(args.classes, args.val_per_class, args.image_size, args.seed, "val")
    log(f"glyphs: {args.classes} classes, {len(train.labels)} train / {len(val.labels)} val pages "
        f"({time.perf_counter() - started:.1f} s)")
    images, labels = as_tensor(train.images), torch.from_numpy(train.labels)
    val_images, val_labels = as_tensor(val.images), torch.from_numpy(val.labels)
    model = timm.create_model(ARCH, pretrained=False, num_classes=args.classes, **model_kwargs(args))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(labels) // args.batch_size
    total, warmup = steps_per_epoch * args.epochs, max(1, round(steps_per_epoch * args.warmup_epochs))
    step, history, stopped = 0, [], False
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(labels), generator=generator)
        running = 0.0
        for k in range(steps_per_epoch):
            index = order[k * args.batch_size:(k + 1) * args.batch_size]
            batch = shifted(images[index], args.shift, generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            loss = F.cross_entropy(model(prepare(batch)), labels[index], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += loss.item()
            step += 1
            if step % 100 == 0:
                log(f"  step {step}/{total}: loss {running / (k + 1):.3f} ({time.perf_counter() - started:.0f} s)")
            if args.max_minutes and time.perf_counter() - started > 60 * args.max_minutes:
                stopped = True
                break
        val_acc = accuracy(model, val_images, val_labels, 512)
        history.append({"epoch": epoch, "steps": step, "train_loss": round(running / max(1, k + 1), 4),
                        "val_top1": round(val_acc, 4)})
        log(f"epoch {epoch}/{args.epochs} step {step}: train loss {running / max(1, k + 1):.3f}, val top-1 "
            f"{val_acc:.2%} ({time.perf_counter() - started:.0f} s)")
        if stopped:
            break
    state = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
    reached = {"val_top1": history[-1]["val_top1"], "history": history, "steps": step, "stopped_early": stopped,
               "seconds": round(time.perf_counter() - started, 1),
               "data": {"generator": "soup.data.glyphs.generate_glyphs", "classes": args.classes,
                        "train_pages": len(labels), "val_pages": len(val_labels), "image_size": args.image_size,
                        "seed": args.seed}}
    return state, reached


def provenance(args, weights: Path, reached: dict) -> dict:
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    return {"file": weights.name, "sha256": digest, "script": "benchmarks/pretrain_start.py",
            "arguments": settings, "backbone": f"timm:{ARCH}", "kwargs": model_kwargs(args),
            "mean": MEAN, "std": STD, **reached,
            "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": args.threads}


def main(argv=None) -> dict:
    args = parse(argv)
    # Called in-process (the tests), the run leaves torch's threads, determinism and RNG as it found them.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            state, reached = pretrain(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp))
    record = provenance(args, args.out, reached)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} (sha256 {record['sha256'][:12]}..., val top-1 {reached['val_top1']:.2%}, "
          f"{reached['seconds']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
