"""Peak memory of `soup cook --uniform --no-eval` over N = 2, 4, 8 ViT-B-size checkpoints.

    python benchmarks/cook_memory.py [--sizes 2 4 8] [--dir /tmp/soup_cook_memory]

Uniform cooking streams one tensor at a time from each safetensors file into an fp32 accumulator, so its
peak should stay near one model (~0.35 GB for ViT-B/14 + a 500-class head) whatever N. Each N runs in a
fresh subprocess; its peak RSS (/proc VmHWM, reset after imports and reading the metadata) is
compared with its RSS just before cooking. The last line is the growth of what cooking adds from the
smallest to the largest N, which should be about zero.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = [f"class{i:03d}" for i in range(500)]


def status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS counter here (Linux), so imports and setup do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    # VmHWM is this process's own peak; ru_maxrss would include the parent's RSS at fork time.
    hwm = status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_mb() -> float:
    """RSS now, with the peak reset to it where the kernel allows (else the peak so far): what cooking adds
    is then peak_mb() minus this."""
    baseline = status_mb("VmRSS") or peak_mb()
    return baseline if reset_peak() else peak_mb()


def ingredient_meta(name: str, index: int, recipe, backbone: str, classes: list[str]) -> dict:
    """The metadata of a made-up ingredient of one start (the benchmarks' stand-ins for a sweep)."""
    return {"kind": "ingredient", "name": name, "id": f"ing{index}", "recipe": recipe.to_dict(),
            "backbone": backbone, "classes": classes, "start_fingerprint": "0" * 16, "seed": index,
            "val_history": [], "val_acc": 0.0}


def make_checkpoints(folder: Path, n: int) -> list[Path]:
    """n ViT-B/14-architecture ingredients (random weights, one start, different noise), written once."""
    import torch

    from soup.models.backbones import build_model
    from soup.models.checkpoint import save_checkpoint
    from soup.recipe.spec import recipe_from_dict

    paths = [folder / f"ing{i}" / "model.safetensors" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    # A data root of its own (never read: cooking here selects nothing): the soups this writes into `folder`
    # on every run must not be files of the data root, which soup never replaces.
    raw = {"name": "mem", "data": {"root": str(folder / "data"), "image_size": 224},
           "model": {"backbone": "timm:vit_base_patch14_dinov2", "pretrained": False, "freeze": 0.75,
                     "kwargs": {"img_size": 224}}}
    recipe = recipe_from_dict(raw)
    state = build_model(recipe.model, CLASSES, 224).state_dict()
    for i, path in enumerate(paths):
        if path.exists():
            continue
        generator = torch.Generator().manual_seed(i)
        noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                 for k, v in state.items()}
        save_checkpoint(path, noisy, ingredient_meta("mem", i, recipe, raw["model"]["backbone"], CLASSES))
    return paths


def child(folder: Path, n: int) -> None:
    from rich.console import Console

    from soup.models.checkpoint import read_checkpoint
    from soup.cook.cooking import cook

    ingredients = [read_checkpoint(folder / f"ing{i}" / "model.safetensors") for i in range(n)]
    baseline = baseline_mb()
    started = time.perf_counter()
    cook("uniform", ingredients, folder / f"soup{n}.safetensors", select_on=None, console=Console(quiet=True),
         overwrite=True)  # a rerun measures again into the same folder
    print(json.dumps({"n": n, "baseline_mb": baseline, "peak_mb": max(peak_mb(), baseline),
                      "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/soup_cook_memory"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.dir, args.child)
        return

    import torch

    print(f"torch {torch.__version__}; ViT-B/14 (timm vit_base_patch14_dinov2, 224 px) + 500-class head; "
          f"checkpoints in {args.dir}", flush=True)
    # In a child too: the parent stays small, so nothing of the setup can leak into a measurement.
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import cook_memory as m; from pathlib import Path; "
                    f"m.make_checkpoints(Path({str(args.dir)!r}), {max(args.sizes)})"], check=True)
    paths = [args.dir / f"ing{i}" / "model.safetensors" for i in range(max(args.sizes))]
    size_mb = paths[0].stat().st_size / 1e6
    print(f"one checkpoint: {size_mb:.0f} MB", flush=True)
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--child", str(n)],
                             check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        added = row["peak_mb"] - row["baseline_mb"]
        print(f"N={n}: peak RSS {row['peak_mb']:.0f} MB (before cooking {row['baseline_mb']:.0f} MB; cooking adds "
              f"{added:.0f} MB = {added / size_mb:.2f} checkpoints) in {row['seconds']:.1f} s", flush=True)
    growth = (rows[-1]["peak_mb"] - rows[-1]["baseline_mb"]) - (rows[0]["peak_mb"] - rows[0]["baseline_mb"])
    print(f"growth from N={rows[0]['n']} to N={rows[-1]['n']}: {growth:+.0f} MB")


if __name__ == "__main__":
    main()
