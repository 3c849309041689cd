"""Time and peak memory of cooking a learned soup on the frozen-prefix cache, on the full model, and greedy.

    python benchmarks/learned_cost.py [--n 8] [--val-per-class 20] [--dir /tmp/soup_learned_cost]

CPU setup: DinoV2's ViT architecture shrunk in width (train_speed.py's "small": 12 blocks, width 192,
3 heads, random weights) at 112 px, freeze 0.75 (patch embedding + 9 blocks frozen), N ingredients made by
perturbing the trainable tensors of one random start (the prefix stays bit-identical, as in a sweep), on
generated sketches. Each way of cooking runs in a fresh subprocess, selecting on val: wall time of
`cook(...)` (building the selector, its caches and scoring the soup included) and the peak RSS (/proc
VmHWM, reset after imports and reading the metadata). The full path is today's learned soup forced by
making `soup.cook.learned.cached_prefix` find no cache. Besides the whole `cook(...)`, each learned row
times the fitting alone (the coefficients' gradient descent, where the two paths differ), and the last line
gives the compute bound of that ratio: (full forward + suffix backward) / (suffix forward + backward) per
image from the model's FLOP counts, as `train_speed.py` counts it, since fitting back-propagates into the
suffix's mixed weights only (a shared frozen prefix gets no gradient on either path).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cook_memory import baseline_mb, ingredient_meta, peak_mb  # noqa: E402

WAYS = {  # name -> (method, options, force the full model)
    "greedy": ("greedy", {}, False),
    "learned (prefix cache)": ("learned", {}, False),
    "learned (full model)": ("learned", {}, True),
    "learned --hyperplane (prefix cache)": ("learned", {"hyperplane": True}, False),
}


def recipe_dict(root: Path) -> dict:
    return {"name": "cost", "data": {"root": str(root), "image_size": 112},
            "model": {"backbone": "timm:vit_small_patch14_dinov2", "pretrained": False, "freeze": 0.75,
                      "kwargs": {"img_size": 112, "embed_dim": 192, "num_heads": 3}},
            "train": {"amp": "off", "num_workers": 0}}


def make_setup(folder: Path, n: int, val_per_class: int) -> None:
    """Sketches and n ingredients of one start that differ only in their trainable (suffix) tensors."""
    import torch

    from soup.data.sketches import generate_sketches
    from soup.models.backbones import build_model, freeze_prefix
    from soup.models.checkpoint import save_checkpoint
    from soup.recipe.spec import recipe_from_dict

    if (folder / f"ing{n - 1}" / "model.safetensors").exists():
        return
    classes = generate_sketches(folder / "data", 8, 4, val_per_class, 4, 160, seed=0)
    raw = recipe_dict(folder / "data")
    recipe = recipe_from_dict(raw)
    torch.manual_seed(0)
    model = build_model(recipe.model, classes, 112)
    freeze_prefix(model.backbone, recipe.model.freeze)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        noisy = {k: v + 2e-2 * torch.randn(v.shape, generator=generator) if k in trained else v
                 for k, v in state.items()}
        save_checkpoint(folder / f"ing{i}" / "model.safetensors", noisy,
                        ingredient_meta("cost", i, recipe, raw["model"]["backbone"], classes))


def _timed(fit, seconds: list):
    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = fit(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        return result
    return timed


def child(folder: Path, n: int, way: str) -> None:
    from rich.console import Console

    import soup.cook.learned as learned
    import soup.cook.methods as methods
    from soup.cook.cooking import cook
    from soup.models.checkpoint import read_checkpoint

    method, options, full = WAYS[way]
    if full:
        learned.cached_prefix = lambda select, shared: None
    fit_seconds = []
    for name in ("fit_softmax", "fit_hyperplane"):
        setattr(methods, name, _timed(getattr(methods, name), fit_seconds))
    ingredients = [read_checkpoint(folder / f"ing{i}" / "model.safetensors") for i in range(n)]
    baseline = baseline_mb()
    started = time.perf_counter()
    path = cook(method, ingredients, folder / "soup.safetensors", "val", console=Console(quiet=True),
                options=options, overwrite=True)
    seconds = time.perf_counter() - started
    meta = read_checkpoint(path).meta
    print(json.dumps({"way": way, "seconds": seconds, "fit_seconds": sum(fit_seconds) if fit_seconds else None,
                      "baseline_mb": baseline, "peak_mb": max(peak_mb(), baseline), "top1": meta["selection"]["top1"],
                      "fitted_on": (meta.get("coefficients") or {}).get("fitted_on", "")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/soup_learned_cost"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.dir, args.n, args.child)
        return

    import torch
    from train_speed import compute_bound

    from soup.models.precision import cpu_flags_line
    from soup.recipe.spec import recipe_from_dict

    make_setup(args.dir, args.n, args.val_per_class)
    subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--n", str(args.n), "--child", "greedy"],
                   check=True, capture_output=True)  # a warm-up: builds the decoded-image store every way reads
    print(f"torch {torch.__version__}; {torch.get_num_threads()} threads; {cpu_flags_line()}")
    print(f"{args.n} ingredients, vit_small_patch14_dinov2 (width 192, 12 blocks) at 112 px, freeze 0.75; "
          f"{8 * args.val_per_class} val images; learned: batch 32, 5 epochs and at least 100 steps", flush=True)
    rows = {}
    for way in WAYS:
        out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--n", str(args.n), "--child", way],
                             check=True, capture_output=True, text=True)
        row = rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
        fitting = f" (fitting {row['fit_seconds']:.1f} s)" if row["fit_seconds"] is not None else ""
        print(f"{way}: {row['seconds']:.1f} s{fitting}, peak RSS {row['peak_mb']:.0f} MB (cooking adds "
              f"{row['peak_mb'] - row['baseline_mb']:.0f} MB), top1 {row['top1']:.2%} {row['fitted_on']}", flush=True)
    full, cached = rows["learned (full model)"], rows["learned (prefix cache)"]
    print(f"speedup of the learned soup on the cache: {full['seconds'] / cached['seconds']:.2f}x (cook), "
          f"{full['fit_seconds'] / cached['fit_seconds']:.2f}x (fitting alone)")
    bound, counted = compute_bound(recipe_from_dict(recipe_dict(args.dir / "data")), 8)
    print(f"bound: {bound:.2f} {counted}")


if __name__ == "__main__":
    main()
