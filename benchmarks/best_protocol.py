"""How `soup cook --best` should compare methods on a small val set (issue 33): picking the method whose soup
scores best on the val split every method selected on ("same split", the old protocol), against
cross-fitting on K parts of val (each part scored by what the others chose, soup.cook.crossfit), K = 2
(two halves) and 4.

    python benchmarks/best_protocol.py --studies 2         # CPU, minutes per study on 2 cores

Each study, seeded by its index, on data no reported figure comes from (its own seeds, 5100+ for the
target, 5200+ for the pretraining pages, 5300+ for the test split): soup_gain.py's set-up (a start
pretrained on clean sketch pages, a probed start, a random search of ingredients fine-tuned on distorted
pages, few images a class), then every method cooked on all of val, and `--best`'s cross-fitted comparison.
Printed per study and on average: the method each protocol picks and the test accuracy of the soup it
writes, minus the ingredient a user picks on val (points); beside them every method's own soup on test.
The test split is read only for these figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from studies import run_studies  # noqa: E402
from rich.console import Console  # noqa: E402

from soup_gain import SPACE, model_section, train_section  # noqa: E402
from soup.cook.best import candidate_methods, cook_best  # noqa: E402
from soup.cook.cooking import cook  # noqa: E402
from soup.data.sketches import generate_sketches  # noqa: E402
from soup.models.checkpoint import find_checkpoints, read_checkpoint  # noqa: E402
from soup.models.precision import cpu_flags_line  # noqa: E402
from soup.recipe.spec import recipe_from_dict  # noqa: E402
from soup.score.evaluator import Evaluator  # noqa: E402
from soup.train.sweep import train_recipe  # noqa: E402

SEEDS = {"data": 5100, "pretrain": 5200, "test": 5300}


def ingredients_of(args, index: int, work: Path, console: Console) -> tuple[list, Path, Path]:
    root, pre_root, test_root = work / "data", work / "pretrain", work / "test"
    if not (test_root / "val_images").is_dir():
        generate_sketches(root, args.classes, args.train_per_class, args.val_per_class, 1, args.page,
                          seed=SEEDS["data"] + index, distorted=True)
        generate_sketches(pre_root, args.classes, args.pretrain_per_class, 5, 0, args.page,
                          seed=SEEDS["pretrain"] + index)
        generate_sketches(test_root, args.classes, 1, args.test_per_class, 1, args.page,
                          seed=SEEDS["test"] + index, distorted=True)
    out = work / "checkpoints"
    pretrain = {"name": "pretrain", "data": {"root": str(pre_root), "image_size": args.image_size},
                "model": model_section(args), "train": train_section(args.pretrain_epochs, 2e-3)}
    [(_, start)] = train_recipe(recipe_from_dict(pretrain), out, console=console, resume=True)
    recipe = {"name": "study", "data": {"root": str(root), "image_size": args.image_size},
              "model": model_section(args, weights=str(start), freeze=args.freeze,
                                     probe={"epochs": 4, "lr": 1e-2, "optimizer": "adamw"}),
              "train": train_section(args.epochs, 1e-3),
              "search": {"trials": args.trials, "seed": index,
                         "space": {"train.lr": {"loguniform": list(args.lr)}, **SPACE}}}
    train_recipe(recipe_from_dict(recipe), out, console=console, resume=True)
    return find_checkpoints([out / "study"], kinds={"ingredient"}), root, test_root


def study(args, index: int, work: Path, console: Console) -> dict:
    ingredients, root, test_root = ingredients_of(args, index, work, console)
    val, test = Evaluator("val", root), Evaluator("val", test_root)
    val_scores = [val(c)["top1"] for c in ingredients]
    picked = ingredients[max(range(len(ingredients)), key=lambda i: (val_scores[i], -i))]
    row = {"picked": test(picked)["top1"], "val": {}, "test": {}}
    for method in candidate_methods():
        path = work / "soups" / f"{method}.safetensors"
        try:
            cook(method, ingredients, path, "val", root, console=console, overwrite=True)
        except Exception as err:  # a method that cannot run here is reported, not fatal
            print(f"  study {index}: {method} not cooked: {err}", flush=True)
            continue
        soup = read_checkpoint(path)
        row["val"][method], row["test"][method] = soup.meta["selection"]["top1"], test(soup)["top1"]
    row["same split"] = max(row["val"], key=lambda m: row["val"][m])  # ties: the earlier method
    gain = {m: (t - row["picked"]) * 100 for m, t in row["test"].items()}
    said = f"same split picks {row['same split']} ({gain[row['same split']]:+.2f})"
    for k in args.folds:
        best = read_checkpoint(cook_best(ingredients, work / "soups" / f"best-{k}.safetensors", "val", root,
                                         console=console, overwrite=True, k=k))
        row[k] = {"winner": best.meta["best"]["winner"], "cross-fitted": best.meta["best"]["candidates"],
                  "test": test(best)["top1"]}
        said += f", {k}-fold picks {row[k]['winner']} ({(row[k]['test'] - row['picked']) * 100:+.2f})"
    print(f"  study {index}: picked ingredient {row['picked']:.2%} on test; {said}; every method: "
          + ", ".join(f"{m} {g:+.2f}" for m, g in gain.items()), flush=True)
    return row


def report(rows: list[dict], ks: list[int]) -> None:
    n = len(rows)
    same = sum(r["test"][r["same split"]] - r["picked"] for r in rows) / n * 100
    print(f"\nmean test gain over the val-picked ingredient, {n} studies (points): same split {same:+.2f} "
          f"(picks {', '.join(r['same split'] for r in rows)})")
    for k in ks:
        cross = sum(r[k]["test"] - r["picked"] for r in rows) / n * 100
        print(f"  {k}-fold cross-fit {cross:+.2f} (picks {', '.join(r[k]['winner'] for r in rows)})")
    print("every method's own soup:")
    for method in rows[0]["test"]:
        mean = sum(r["test"][method] - r["picked"] for r in rows if method in r["test"]) / n * 100
        print(f"  {method:<8} {mean:+.2f}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=4, help="the issue's small val set")
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--freeze", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--pretrain-per-class", type=int, default=60)
    parser.add_argument("--backbone", default="timm:test_nfnet")
    parser.add_argument("--lr", type=float, nargs=2, default=[5.0e-4, 2.0e-3])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--page", type=int, default=64)
    parser.add_argument("--folds", type=int, nargs="+", default=[2, 4], help="cross-fitting parts to compare")
    parser.add_argument("--work", type=Path, default=None, help="work folder, kept (default: a temporary one)")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_flags_line()}; {args.studies} studies from {args.first}; {args.classes} classes, "
          f"{args.train_per_class} train / {args.val_per_class} val / {args.test_per_class} test a class", flush=True)
    console = Console(quiet=True)
    rows, started = run_studies(args, "best_protocol_", lambda index, folder: study(args, index, folder, console))
    report(rows, args.folds)
    print(f"total: {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
