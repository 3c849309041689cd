"""Is the shipped start (soup/assets/glyph_vit.safetensors) worth starting from? Measured as a user would, with
`soup train` and recipes, on the demo's fine-tuning set (soup/demo.py: the first 8 sketch shapes on
distorted pages, 40 train / 30 val a class, seed 2), or the 16-shape version of it (--classes 16).

    python benchmarks/start_worth.py                 # about 8 minutes on 2 cores
    python benchmarks/start_worth.py --data-seed 12 --rows start --seeds 1 --lr 1e-3 3e-3   # tuning

Four rows, each one recipe (a linear probe, then fine-tunes of several seeds from the probed start, LP-FT):
the same recipe from the shipped start and from a random init of the same architecture, half of the
backbone frozen; and a full fine-tune (nothing frozen) of both, the most a random init can make of the
data. Figures are top-1 on the set's val split. No setting was chosen on it: the fine-tunes' lr and
augmentation were picked on another draw of the same set (--data-seed 12), from the start's row alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soup.data.sketches import SHAPES, generate_sketches  # noqa: E402
from soup.demo import FULL  # noqa: E402
from soup.models.checkpoint import find_checkpoints, read_checkpoint  # noqa: E402
from soup.recipe.spec import recipe_from_dict  # noqa: E402
from soup.train.probe import probe_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "soup" / "assets" / "glyph_vit.safetensors"
ROWS = {"start": True, "random": False, "start-full": True, "random-full": False}  # name -> from the start?


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=Path, default=ASSET)
    p.add_argument("--work", type=Path, default=Path("start_worth"), help="data and runs go here")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--data-seed", type=int, default=2, help="2: the demo's draw; another draws a set to tune on")
    p.add_argument("--seeds", type=int, default=3, help="fine-tunes per row and lr")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, nargs="+", default=[3e-3])
    p.add_argument("--freeze", type=float, default=0.5)
    p.add_argument("--augment", default="crop_hflip", help="the fine-tunes' data.augment (the probe never augments)")
    p.add_argument("--probe-epochs", type=int, default=50)
    p.add_argument("--probe-lr", type=float, default=3e-3)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    return p.parse_args(argv)


def recipe(args, name: str, data: Path, start: dict, weights: Path | None, freeze: float) -> dict:
    model = {"backbone": start["backbone"], "pretrained": False, "kwargs": start["kwargs"], "freeze": freeze,
             "probe": {"epochs": args.probe_epochs, "lr": args.probe_lr, "optimizer": "adamw"}}
    if weights is not None:
        model["weights"] = str(weights.resolve())
    return {"name": name, "data": {"root": str(data.resolve()), "image_size": start["data"]["image_size"],
                                                    "augment": args.augment},
            "model": model,
            "train": {"epochs": args.epochs, "batch_size": 32, "optimizer": "adamw", "lr": args.lr[0],
                      "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.1,
                      "amp": "off", "num_workers": 0, "device": "cpu", "log": "none"},
            "sweep": {"train.lr": args.lr, "train.seed": list(range(args.seeds))}}


def run(args, spec: dict) -> dict:
    """`soup train` on the recipe; the probe's and each fine-tune's val top-1 as their checkpoints record."""
    path = args.work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run([sys.executable, "-m", "soup", "train", str(path), "--out", str(args.work / "runs")],
                   check=True, cwd=ROOT)
    probe = read_checkpoint(probe_file(recipe_from_dict(spec), args.work / "runs")).meta["val_acc"]
    tuned = {}
    for c in find_checkpoints([args.work / "runs" / spec["name"]], kinds={"ingredient"}):
        tuned.setdefault(c.meta["recipe"]["train"]["lr"], []).append(c.meta["val_acc"])
    return {"name": spec["name"], "probe": probe, "fine_tunes": tuned}


def main(argv=None) -> list[dict]:
    args = parse(argv)
    start = json.loads(args.start.with_suffix(".json").read_text())
    data = args.work / f"sketches{args.classes}-seed{args.data_seed}"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (data / "val_images").is_dir():  # the demo's fine-tuning set, as soup/demo.py draws it
        generate_sketches(data, list(SHAPES)[:args.classes], FULL.train_per_class, FULL.val_per_class, 40,
                          seed=args.data_seed, distorted=True)
    rows = []
    for label in args.rows:
        freeze = 0.0 if label.endswith("full") else args.freeze
        name = f"{label}-f{int(freeze * 100)}-{args.augment}-c{args.classes}-d{args.data_seed}"
        rows.append(run(args, recipe(args, name, data, start, args.start if ROWS[label] else None, freeze)))
    print(f"\nregime: {args.classes} sketch shapes, distorted pages drawn from seed {args.data_seed} (2: the demo's); "
          f"start {args.start.name} (sha256 {start['sha256'][:12]}) vs random init; val top-1")
    print("| run | linear probe | fine-tune lr | fine-tunes (mean; min-max over seeds) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        for lr, tuned in sorted(row["fine_tunes"].items()):
            print(f"| {row['name']} | {row['probe']:.2%} | {lr:g} | {sum(tuned) / len(tuned):.2%}; "
                  f"{min(tuned):.2%}-{max(tuned):.2%} |")
    (args.work / f"figures-c{args.classes}-d{args.data_seed}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
