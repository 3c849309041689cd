"""What soups are for: test accuracy of every soup method minus that of the ingredient a user would pick
on val, over whole studies repeated with different seeds.

    python benchmarks/soup_gain.py                  # 3 studies, CPU, about 8 minutes on 2 cores
    python benchmarks/soup_gain.py --studies 1      # one study, a quick look
    python benchmarks/soup_gain.py --backbone timm:test_resnet   # BatchNorm: every method with and without
                                                                 # the BatchNorm reset, in one run
    python benchmarks/soup_gain.py --backbone glyph-vit --train-per-class 40 --epochs 20 --freeze 0.5 \
        --page 40 --prune-at 10 --best-folds 2 4     # the shipped start (issue 33): ~7 minutes a study

With `--backbone glyph-vit` step 2 below is replaced: the start is the file soup ships (docs/start.md), a
ViT pretrained on stroke characters the sketches never show, fine-tuned with start_worth.py's recipe
(LP-FT, crop_hflip, AdamW with a cosine; chosen on another draw of the sketches) and a search over lr,
weight decay, label smoothing and seed, pruned by the start rule with --prune-at. `--best-folds` adds the
soup each way of choosing among methods picks (issue 33 section 5): the best on the val every method
selected on, and `soup cook --best` cross-fitted on K parts of val.

Each study, seeded by its index:
1. Data made hard enough that ingredients disagree, and not the tests' data: the 16 sketch shapes on
   distorted pages (erased blocks, speckle, blur: soup.data.sketches.distort), 20 train images per class.
   Two labelled test splits, each the val_images of a data root of its own, read only for the final
   figures: "published" (seeds 300+), on whose table two defaults were chosen (the learned soup's 100-step
   minimum and guided's patience 3, issue 19), and "fresh" (seeds 400+), on which nothing was chosen: the
   fresh one is the honest figure.
2. A start pretrained on clean pages of the same shapes (the stand-in for DinoV2), a probed start (the
   head trained on the frozen backbone, `model.probe`), then a random search of ingredients (lr,
   augmentation, weight decay, label smoothing, seed) fine-tuned from it with a quarter of the backbone
   frozen.
3. Every registered soup method (and the variants in VARIANTS) is cooked with val as its selection set,
   the same information the user has when picking the best ingredient on val, once with the BatchNorm
   reset (the default) and once without (--no-bn-reset: the "no BN reset" rows; on a model without
   BatchNorm both soups are the same bytes). Then every soup, the logit ensemble of the ingredients and
   the val-picked ingredient are scored on the test splits.

Printed: per method, the test accuracy minus the val-picked ingredient's in points, averaged over the
studies, with a paired 95% bootstrap interval over all test images of all studies together, the per-study
differences, and the method's cooking time (mean over studies); for greedy-like methods also the weight
sets they scored; and the BatchNorm reset's time per weight set. Everything runs in one process; time it alone (other processes on 2 cores distort it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402

import soup.cook.batchnorm  # noqa: E402
from soup.cook.batchnorm import DEFAULT_IMAGES  # noqa: E402
from glyph_search import GLYPH_VIT, add_glyph_options, glyph_recipe, regime  # noqa: E402
from studies import run_studies  # noqa: E402
from soup.cook.best import candidate_methods, cook_best  # noqa: E402
from soup.cook.cooking import cook  # noqa: E402
from soup.data.sketches import generate_sketches  # noqa: E402
from soup.judge.evaluate import ensemble_logits  # noqa: E402
from soup.models.checkpoint import find_checkpoints, read_checkpoint  # noqa: E402
from soup.models.precision import cpu_flags_line  # noqa: E402
from soup.recipe.spec import recipe_from_dict  # noqa: E402
from soup.score.compare import difference  # noqa: E402
from soup.score.evaluator import Evaluator, predictions  # noqa: E402
from soup.train.probe import probe_file  # noqa: E402
from soup.train.sweep import train_recipe  # noqa: E402

# Method variants beside each registered method's defaults: name -> (method, options).
VARIANTS: dict[str, tuple[str, dict]] = {"hyperplane": ("learned", {"hyperplane": True}),
                                         # the defaults before the benchmark measured them
                                         "learned 5 epochs": ("learned", {"epochs": 5}),
                                         "guided patience 2": ("guided", {"patience": 2}),
                                         "greedy by loss": ("greedy", {"criterion": "loss"})}
CHEAP_VARIANTS = ("greedy by loss",)  # cooked at glyph-vit too, where the other variants are skipped for time
TEST_SEEDS = {"fresh": 400, "published": 300}  # the fresh split first: the one reported
RESET_SECONDS: list[float] = []  # each BatchNorm reset's time, all studies together
SPACE = {
    "data.augment": {"choice": ["none", "crop_hflip", "trivialaugment"]},
    "train.weight_decay": {"choice": [0.0, 0.01, 0.05]},
    "train.label_smoothing": {"uniform": [0.0, 0.2]},
    "train.seed": {"randint": [0, 999]},
}


def model_section(args, **extra) -> dict:
    return {"backbone": args.backbone, "pretrained": False, **extra}


def train_section(epochs: int, lr: float) -> dict:
    return {"epochs": epochs, "batch_size": 32, "optimizer": "adamw", "lr": lr, "weight_decay": 0.05,
            "lr_drop_epoch": max(2, epochs - 1), "amp": "off", "num_workers": 0}


def study_recipe(args, index: int, root: Path, pre_root: Path, out: Path, console: Console):
    """The study's search recipe. From today's weak start: a start pretrained here on clean pages of the
    same shapes. From the shipped glyph ViT (`--backbone glyph-vit`): glyph_recipe, with the start rule
    pruning draws that end below the probed start."""
    if args.backbone == GLYPH_VIT:
        search = {"trials": args.trials, "seed": index}
        if args.prune_at:
            search |= {"prune": {"rule": "start", "at": args.prune_at}, "max_trials": args.trials + args.refills}
        return recipe_from_dict(glyph_recipe(args, root, "study", search))
    pretrain = {"name": "pretrain", "data": {"root": str(pre_root), "image_size": args.image_size},
                "model": model_section(args), "train": train_section(args.pretrain_epochs, 2e-3)}
    [(_, weights)] = train_recipe(recipe_from_dict(pretrain), out, console=console, resume=True)
    model = model_section(args, weights=str(weights), freeze=args.freeze,
                          probe={"epochs": 4, "lr": 1e-2, "optimizer": "adamw"})
    search = {"space": {"train.lr": {"loguniform": list(args.lr)}, **SPACE}}
    data = {"root": str(root), "image_size": args.image_size}
    return recipe_from_dict({"name": "study", "data": data, "model": model, "train": train_section(args.epochs, 1e-3),
                             "search": {"trials": args.trials, "seed": index, **search}})


def study(args, index: int, work: Path, console: Console) -> dict:
    """One whole study; returns per test split, per method its test predictions, cooking time and scorings."""
    root, pre_root = work / "data", work / "pretrain"
    test_roots = {split: work / ("test" if split == "published" else f"test_{split}") for split in TEST_SEEDS}
    # The target: distorted pages, few per class. Each test split is the val_images of a root of its own.
    for split, seed in TEST_SEEDS.items():
        if not (test_roots[split] / "val_images").is_dir():  # a kept --work folder already holds it
            generate_sketches(test_roots[split], args.classes, 1, args.test_per_class, 1, args.page,
                              seed=seed + index, distorted=True)
    if not (root / "val_images").is_dir():
        generate_sketches(root, args.classes, args.train_per_class, args.val_per_class, 1, args.page,
                          seed=100 + index, distorted=True)
    if args.backbone != GLYPH_VIT and not (pre_root / "val_images").is_dir():
        # The start: clean pages of the same shapes, as a pretrained backbone has seen clean images.
        generate_sketches(pre_root, args.classes, args.pretrain_per_class, 5, 0, args.page, seed=200 + index)
    out = work / "checkpoints"
    recipe = study_recipe(args, index, root, pre_root, out, console)
    train_recipe(recipe, out, console=console, resume=True)
    drawn = find_checkpoints([out / "study"], kinds={"ingredient"})
    ingredients = [c for c in drawn if c.record.pruned is None]  # as `soup cook` leaves pruned draws out

    tests = {split: Evaluator("val", test_root) for split, test_root in test_roots.items()}
    val = Evaluator("val", root)
    val_scores = [val(c)["top1"] for c in ingredients]
    probe = ingredients[0].meta.get("probe") or {}
    print(f"  study {index}: probed start {probe.get('val_acc', float('nan')):.2%} on val; ingredients on val: "
          + " ".join(f"{v:.1%}" for v in val_scores), flush=True)
    best = max(range(len(ingredients)), key=lambda i: (val_scores[i], -i))
    picked = ingredients[best]
    results = {split: {"picked_name": picked.name, "drawn": len(drawn), "start_name": probe_name(recipe, out)}
               for split in tests}
    for split, test in tests.items():
        # Each ingredient's test logits once: the picked one's figures and the ensemble both read them.
        test_logits = [test.logits(c) for c in ingredients]
        results[split]["picked"] = {"outcome": predictions(*test_logits[best], picked.classes)}
        logits, _ = ensemble_logits([(c, member_logits) for c, (member_logits, _) in zip(ingredients, test_logits)])
        results[split]["ensemble"] = {"outcome": predictions(logits, test_logits[0][1], picked.classes),
                                      "seconds": 0.0, "scored": None}
        start = probe_path(recipe, out)
        results[split]["start"] = None if start is None else predictions(*test.logits(read_checkpoint(start)),
                                                                          picked.classes)
        results[split]["above_start"] = (
            None if start is None else
            sum(predictions(*lg, picked.classes).correct.double().mean().item()
                >= results[split]["start"].correct.double().mean().item() for lg in test_logits))
    glyph = args.backbone == GLYPH_VIT  # no BatchNorm: the reset changes nothing; variants skipped for time
    methods = {name: (name, {}) for name in candidate_methods()} | (
        {k: VARIANTS[k] for k in CHEAP_VARIANTS} if glyph else VARIANTS)
    for name, (method, options) in methods.items():
        for reset in ((True,) if glyph else (True, False)):
            row = name if reset else f"{name}, no BN reset"
            path = out / "soups" / f"{row}.safetensors"
            started = time.perf_counter()
            try:
                cook(method, ingredients, path, "val", root, console=console, options=options, overwrite=True,
                     bn_images=DEFAULT_IMAGES if reset else None)
            except Exception as err:  # a method that cannot run here is reported, not fatal
                console.print(f"[yellow]{row} not cooked[/]: {err}")
                continue
            seconds = time.perf_counter() - started
            cooked = read_checkpoint(path)
            n = len(ingredients)
            scored = ((cooked.meta.get("guided") or {}).get("scored")
                      or (2 * n - 1 if method in ("greedy", "topk") else None))
            for split, test in tests.items():
                results[split][row] = {"outcome": predictions(*test.logits(cooked), cooked.classes),
                                       "seconds": seconds, "scored": scored,
                                       "members": len(cooked.meta.get("members", []))}
    protocols(args, ingredients, root, out, tests, results, console)
    summary(index, results["fresh"], len(ingredients))
    return results


def protocols(args, ingredients: list, root: Path, out: Path, tests: dict, results: dict, console) -> None:
    """Issue 33 section 5 on this benchmark's test splits: the method whose soup scores best on the val it
    selected on ("same split"), and `soup cook --best` cross-fitted on K parts of val (--best-folds)."""
    cooked = [n for n in results["fresh"] if n in candidate_methods()]
    if not args.best_folds or not cooked:
        return
    val_of = {n: read_checkpoint(out / "soups" / f"{n}.safetensors").meta["selection"]["top1"] for n in cooked}
    same = max(cooked, key=lambda n: val_of[n])  # ties: the earlier method
    for split in tests:
        results[split]["protocols"] = {"same split": (same, results[split][same]["outcome"])}
    for k in args.best_folds:
        path = cook_best(ingredients, out / "soups" / f"best-{k}.safetensors", "val", root, console=console,
                         overwrite=True, k=k)
        best = read_checkpoint(path)
        for split, test in tests.items():
            results[split]["protocols"][f"--best, {k} folds"] = (
                best.meta["best"]["winner"], predictions(*test.logits(best), best.classes))


def probe_path(recipe, out: Path) -> Path | None:
    path = probe_file(recipe, out)
    return path if path is not None and path.is_file() else None


def probe_name(recipe, out: Path) -> str:
    path = probe_path(recipe, out)
    return "no probe" if path is None else path.name


def top1(outcome) -> float:
    return outcome.correct.double().mean().item()


def summary(index: int, split: dict, finished: int) -> None:
    """One study's headline on the fresh test split: gains over the val-picked ingredient, paired intervals."""
    base = split["picked"]["outcome"]
    soups = [n for n in split if isinstance(split[n], dict) and "outcome" in split[n]
             and n not in ("picked", "ensemble") and split[n]["outcome"] is not None]
    best = max(soups, key=lambda n: top1(split[n]["outcome"]))
    start = split.get("start")
    said = [f"study {index} (fresh test): picked {top1(base):.2%}",
            f"start (probe) {top1(start):.2%}" if start is not None else "no probe",
            f"finished draws {finished} of {split['drawn']} drawn, {split['above_start']} at or above the start on test"
            if start is not None else f"finished draws {finished}"]
    for label, name in (("greedy", "greedy"), (f"best soup {best}", best), ("ensemble", "ensemble")):
        d = difference(split[name]["outcome"], base)
        said.append(f"{label} {d['diff'] * 100:+.2f} [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]")
    print("  " + "; ".join(said), flush=True)


def timed_resets() -> None:
    """Each BatchNorm reset timed (benchmark only): the cost per weight set the docs quote."""
    measure = soup.cook.batchnorm.StatsReset._measure

    def timed(self, state, names):
        started = time.perf_counter()
        try:
            return measure(self, state, names)
        finally:
            RESET_SECONDS.append(time.perf_counter() - started)
    soup.cook.batchnorm.StatsReset._measure = timed


def pooled(outcomes: list) -> object:
    """The studies' per-image outcomes as one set of predictions (the paired interval pools every image)."""
    first = outcomes[0]
    return type(first)(torch.cat([o.predicted for o in outcomes]), torch.cat([o.confidence for o in outcomes]),
                       torch.cat([o.targets for o in outcomes]), first.classes)


def report(studies: list[dict], split: str) -> None:
    studies = [s[split] for s in studies]
    picked = [s["picked"]["outcome"] for s in studies]
    base = pooled(picked)
    print(f"\n=== test split {split!r} (seeds {TEST_SEEDS[split]}+"
          + ("; two defaults were chosen on this split's table" if split == "published" else "; nothing chosen on it")
          + ")")
    print(f"val-picked ingredient: test top-1 {base.correct.double().mean().item():.2%} "
          f"({', '.join(s['picked_name'] for s in studies)})")
    print(f"{'method':<32} {'test top-1':>10} {'Δ points':>9} {'95% CI (paired, pooled)':>24}  per study"
          f"{'':>14} {'time s':>7} {'members':>7} {'scored':>6}")
    names = [n for n in studies[0] if isinstance(studies[0][n], dict) and "outcome" in studies[0][n]
             and n != "picked"]
    if all(s.get("start") is not None for s in studies):
        d = difference(pooled([s["start"] for s in studies]), base)
        print(f"probed start: test top-1 {top1(pooled([s['start'] for s in studies])):.2%}, "
              f"{d['diff'] * 100:+.2f} points from the picked ingredient; finished draws at or above it on test: "
              + ", ".join(f"{s['above_start']}" for s in studies))
    for name in names:
        if not all(name in s and s[name]["outcome"] is not None for s in studies):
            continue
        outcome = pooled([s[name]["outcome"] for s in studies])
        d = difference(outcome, base)
        per = [difference(s[name]["outcome"], s["picked"]["outcome"], resamples=0)["diff"] for s in studies]
        seconds = sum(s[name]["seconds"] for s in studies) / len(studies)
        members = [s[name].get("members") for s in studies]
        scored = [s[name].get("scored") for s in studies]
        print(f"{name:<32} {outcome.correct.double().mean().item():>10.2%} {d['diff'] * 100:>+9.2f} "
              f"{'[' + format(d['low'] * 100, '+.2f') + ', ' + format(d['high'] * 100, '+.2f') + ']':>24}  "
              f"{' '.join(format(p * 100, '+.2f') for p in per):<22} {seconds:>7.2f} "
              f"{'/'.join(str(m) for m in members if m is not None):>7} "
              f"{'/'.join(str(x) for x in scored if x is not None):>6}  (p={d['p']:.3f})")
    if "protocols" in studies[0]:
        print("\nchoosing the soup (issue 33 section 5): the pick of each protocol, test minus the val-picked ingredient")
        for protocol in studies[0]["protocols"]:
            chosen = [s["protocols"][protocol] for s in studies]
            d = difference(pooled([o for _, o in chosen]), base)
            print(f"  {protocol:<20} {d['diff'] * 100:>+6.2f} points [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]"
                  f"  picks {', '.join(m for m, _ in chosen)}")
    # The issue's targets compare methods with greedy itself: the same test images, paired.
    greedy = pooled([s["greedy"]["outcome"] for s in studies])
    print("\nagainst greedy (paired, pooled over the studies' test images):")
    for name in names:
        if name == "greedy" or not all(name in s and s[name]["outcome"] is not None for s in studies):
            continue
        d = difference(pooled([s[name]["outcome"] for s in studies]), greedy)
        print(f"  {name:<32} {d['diff'] * 100:>+6.2f} points [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}] "
              f"(p={d['p']:.3f})")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--first", type=int, default=0,
                        help="index (and seed) of the first study: studies no earlier report used start at 3")
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--freeze", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--pretrain-per-class", type=int, default=60)
    # timm's norm-free test network: no BatchNorm statistics to average (the paper's soups are ViTs with
    # LayerNorm), and unlike timm's tiny test ViT and ConvNeXt it learns sketch shapes from scratch in a few
    # CPU epochs: 74% on clean pages after 8 (test_vit and test_convnext stayed near chance in that budget).
    parser.add_argument("--backbone", default="timm:test_nfnet",
                        help=f"a timm spec, pretrained here on clean pages; or {GLYPH_VIT!r}: the shipped start")
    parser.add_argument("--lr", type=float, nargs=2, default=None,
                        help="the search's lr band (default 5e-4 2e-3; at glyph-vit 1.5e-3 6e-3, around 3e-3)")
    add_glyph_options(parser)
    parser.add_argument("--prune-at", type=int, nargs="*", default=[],
                        help="glyph-vit: rung epochs of the start rule (it also judges the final epoch)")
    parser.add_argument("--refills", type=int, default=4, help="with --prune-at: draws beyond --trials")
    parser.add_argument("--best-folds", type=int, nargs="*", default=[],
                        help="also report `soup cook --best` cross-fitted on these K, and the same-split pick")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--page", type=int, default=64, help="smallest side of the generated pages (px)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder, kept: a rerun with the same settings reuses its data and ingredients "
                             "and cooks again (default: a temporary folder, removed)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = [1.5e-3, 6.0e-3] if args.backbone == GLYPH_VIT else [5.0e-4, 2.0e-3]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    console = Console(quiet=not args.verbose, highlight=False)
    print(f"CPU: {cpu_flags_line()}; torch {torch.__version__}; {args.studies} studies x {args.trials} "
          f"ingredients; {args.classes} classes, {args.train_per_class} train / {args.val_per_class} val / "
          f"{args.test_per_class} test images per class; regime: {regime(args, freeze=True)}", flush=True)
    timed_resets()
    studies, started = run_studies(
        args, "soup_gain_", lambda index, folder: study(args, index, folder, console),
        lambda index, seconds: f"study {index + 1 - args.first}/{args.studies} done at {seconds:.0f} s")
    for split in TEST_SEEDS:
        report(studies, split)
    if RESET_SECONDS:
        print(f"\nBatchNorm reset: {len(RESET_SECONDS)} weight sets re-estimated, "
              f"{sum(RESET_SECONDS) / len(RESET_SECONDS):.3f} s each (mean; min {min(RESET_SECONDS):.3f}, "
              f"max {max(RESET_SECONDS):.3f})")
    else:
        print("\nBatchNorm reset: no weight set needed one (a model without BatchNorm)")
    print(f"total: {math.ceil(time.perf_counter() - started)} s")
    return studies


if __name__ == "__main__":
    main()
