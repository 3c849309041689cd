"""Is the shipped start (soup/assets/glyph_vit.safetensors) worth starting from? Measured as a user would, with
`soup train` and recipes, on the demo's fine-tuning set (soup/demo.py: the first 8 sketch shapes on
distorted pages, 40 train / 30 val a class, seed 2), or the 16-shape version of it (--classes 16).

    python benchmarks/start_worth.py                 # about 10 minutes on 2 cores
    python benchmarks/start_worth.py --classes 16

Four rows, each one recipe (a linear probe, then fine-tunes of several seeds from the probed start, LP-FT):
the same recipe from the shipped start and from a random init of the same architecture; and a full
fine-tune (nothing frozen) of both, the most a random init can make of the data. Figures are top-1 on the
set's val split; no setting was chosen on it (the recipe's settings were fixed before it ran).
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


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=Path, default=ASSET)
    p.add_argument("--work", type=Path, default=Path("start_worth"), help="data and runs go here")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3, help="fine-tunes per row")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--freeze", type=float, default=0.5)
    p.add_argument("--probe-epochs", type=int, default=30)
    return p.parse_args(argv)


def recipe(args, name: str, data: Path, start: dict, weights: Path | None, freeze: float) -> dict:
    model = {"backbone": start["backbone"], "pretrained": False, "kwargs": start["kwargs"], "freeze": freeze,
             "probe": {"epochs": args.probe_epochs, "lr": 1.0e-3, "optimizer": "adamw"}}
    if weights is not None:
        model["weights"] = str(weights.resolve())
    return {"name": name, "data": {"root": str(data.resolve()), "image_size": start["data"]["image_size"]},
            "model": model,
            "train": {"epochs": args.epochs, "batch_size": 32, "optimizer": "adamw", "lr": args.lr,
                      "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.1,
                      "amp": "off", "num_workers": 0, "device": "cpu", "log": "none"},
            "sweep": {"train.seed": list(range(args.seeds))}}


def run(args, spec: dict) -> dict:
    """`soup train` on the recipe; the probe's and each fine-tune's val top-1 as their checkpoints record."""
    path = args.work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    subprocess.run([sys.executable, "-m", "soup", "train", str(path), "--out", str(args.work / "runs")],
                   check=True, cwd=ROOT)
    probe = read_checkpoint(probe_file(recipe_from_dict(spec), args.work / "runs")).meta["val_acc"]
    tuned = [c.meta["val_acc"] for c in find_checkpoints([args.work / "runs" / spec["name"]], kinds={"ingredient"})]
    return {"name": spec["name"], "probe": probe, "fine_tunes": tuned}


def main(argv=None) -> list[dict]:
    args = parse(argv)
    start = json.loads(args.start.with_suffix(".json").read_text())
    data = args.work / f"sketches{args.classes}"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (data / "val_images").is_dir():  # the demo's fine-tuning set, as soup/demo.py draws it
        generate_sketches(data, list(SHAPES)[:args.classes], FULL.train_per_class, FULL.val_per_class, 40,
                          seed=2, distorted=True)
    rows = []
    for label, weights in (("start", args.start), ("random", None)):
        for freeze in (args.freeze, 0.0):
            name = f"{label}-f{int(freeze * 100)}-c{args.classes}"
            rows.append(run(args, recipe(args, name, data, start, weights, freeze)))
    print(f"\nregime: {args.classes} sketch shapes (demo's set, distorted pages); start {args.start.name} "
          f"(sha256 {start['sha256'][:12]}) vs random init; val top-1")
    print("| run | linear probe | fine-tunes (mean; min-max) |")
    print("| --- | --- | --- |")
    for row in rows:
        tuned = row["fine_tunes"]
        print(f"| {row['name']} | {row['probe']:.2%} | {sum(tuned) / len(tuned):.2%}; "
              f"{min(tuned):.2%}-{max(tuned):.2%} |")
    (args.work / f"figures-c{args.classes}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
