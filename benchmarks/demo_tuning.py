"""How `soup demo`'s search was chosen: its recipe (soup/demo.py) on another draw of its data (seed 12, not
the demo's 2), one lr band and greedy criterion at a time, scored on that draw's val split.

    python benchmarks/demo_tuning.py --lr 1.5e-3 4.5e-3 --lr 3e-3 9e-3   # about a minute a band, one core

Per band: the probe, the six finished draws, and on val the best draw, the uniform and greedy soups (the
paper's criterion and `--criterion loss`, both selected on the held-out slice as the demo does) and the
logit ensemble. The demo's own figures (seed 2) chose nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from soup.cook.cooking import cook  # noqa: E402
from soup.data.sketches import generate_sketches  # noqa: E402
from soup.demo import CLASSES, FULL, SEARCH_SPACE, SMALL, _recipe  # noqa: E402
from soup.judge.evaluate import evaluate_rows  # noqa: E402
from soup.models.checkpoint import find_checkpoints, read_checkpoint  # noqa: E402
from soup.recipe.spec import recipe_from_dict  # noqa: E402
from soup.score.evaluator import Evaluator  # noqa: E402
from soup.train.sweep import train_recipe  # noqa: E402


def band(size, lr: list[float], work: Path, root: Path, quiet: Console) -> str:
    name = f"lr{lr[0]:g}-{lr[1]:g}"
    recipe = _recipe(name, root, size, probe={"epochs": size.probe_epochs, "lr": 3e-3, "optimizer": "adamw"})
    recipe["search"] = {"trials": size.trials, "seed": 0, "space": {**SEARCH_SPACE, "train.lr": {"loguniform": lr}},
                        "max_trials": 2 * size.trials, "prune": {"rule": "start", "at": max(1, size.epochs // 2)}}
    out = work / "checkpoints"
    train_recipe(recipe_from_dict(recipe), out, console=quiet, resume=True)
    drawn = find_checkpoints([out / name], kinds={"ingredient"})
    ingredients = [c for c in drawn if c.record.pruned is None]
    soups = [read_checkpoint(cook(m, ingredients, out / "soups" / f"{name}-{label}.safetensors", "holdout",
                                  console=quiet, options=o, overwrite=True))
             for label, m, o in (("uniform", "uniform", {}), ("greedy", "greedy", {}),
                                 ("greedy-loss", "greedy", {"criterion": "loss"}))]
    rows = [row for row, _ in evaluate_rows(ingredients + soups, Evaluator("val"), ensemble=True)]
    draws = [row["top1"] for row in rows[:len(ingredients)]]
    probe = ingredients[0].record.probe.val_acc
    said = " ".join(f"{label} {row['top1']:.2%} ({len(s.record.members)})" for label, s, row in
                    zip(("uniform", "greedy", "greedy-loss"), soups, rows[len(ingredients):]))
    ensemble = rows[-1]["top1"]  # the ensemble's row comes last
    return (f"lr {lr[0]:g}-{lr[1]:g}: probe {probe:.2%}; {len(ingredients)} of {len(drawn)} draws finished, val "
            f"{min(draws):.2%}-{max(draws):.2%}; {said}; ensemble {ensemble:.2%}")


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, nargs=2, action="append", required=True, help="a band to try (repeatable)")
    p.add_argument("--data-seed", type=int, default=12)
    p.add_argument("--work", type=Path, default=None, help="kept work folder (default: a temporary one)")
    p.add_argument("--small", action="store_true", help="the demo's --small size (the tests)")
    args = p.parse_args(argv)
    size = SMALL if args.small else FULL
    work = args.work or Path(tempfile.mkdtemp(prefix="demo_tuning_"))
    root = work / f"data-seed{args.data_seed}"
    if not (root / "val_images").is_dir():
        generate_sketches(root, CLASSES, size.train_per_class, size.val_per_class, 40, seed=args.data_seed,
                          distorted=True)
    lines = []
    for lr in args.lr:
        lines.append(band(size, lr, work, root, Console(quiet=True)))
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
