"""A whole study, timed stage by stage: soup's CLI against the seed-style plain loop, in one process.

    python benchmarks/whole_study.py                 # on a GPU: the reference recipe's shape (below)
    python benchmarks/whole_study.py --arch tiny --image-size 28 --classes 4 --train-per-class 6 \\
        --val-per-class 3 --test-images 5 --epochs 1 --ingredients 2 --batch-size 8 --amp off
                                                     # CPU, seconds: what tests/benchmarks/test_whole_study.py runs

The reference recipe's shape (recipes/dinov2_f75.yaml): DinoV2's ViT-B/14 architecture at 224 px (timm's
port, random weights: none can be downloaded here), freeze 0.75, SGD lr 5e-3 momentum 0.9 dropping tenfold
at 70% of the epochs, bf16 autocast, a sweep of 8 ingredients (seeds) from one start, on generated sketches
dealt into 500 classes. Stages, each timed with its peak GPU memory:

  soup        `soup train` -> `soup cook --greedy` (on val) -> `soup eval --ensemble` -> `soup submit`, each
              through soup's own CLI entry point (soup.cli.cli) as a user types it. The in-process caches are
              emptied before each command (separate commands are separate processes); soup's store on disk
              stays between them, as it does for a user.
  seed-style  what the course's seed code does, in plain torch: per ingredient an ImageFolder + PIL
              transforms through a DataLoader every epoch, the whole (partly frozen) model forward, autocast,
              a val pass per epoch, torch.save; then a greedy soup by hand (Wortsman et al.: ingredients by
              val accuracy, each kept if the average does not lose on val), every model and their ensemble
              evaluated on val, the soup's predictions written as Id,Category. The model is built by
              soup.models (same architecture, start and frozen parameters as soup's); nothing else of soup.

`--seed-ingredients K` below the sweep trains only K seed-style ingredients (its cost is linear: it shares
nothing between them); its total for all N is then estimated from the measured stages as
train x N/K + cook x (N-1)/(K-1) + eval x (N+1)/(K+1) + submit (with K = 1, each of the N-1 candidate
soups costs one val pass, eval/2), and says so. The last lines are `total:`
per path and `speedup:` (seed-style total / soup total); `--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_speed  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from soup.cli import cli  # noqa: E402
from soup.data.folders import TEST_FOLDER, build_transform, load_rgb  # noqa: E402
from soup.fast import decoded as fast_decoded, prefix as fast_prefix  # noqa: E402
from soup.models.backbones import build_model, freeze_prefix  # noqa: E402
from soup.models.checkpoint import read_checkpoint  # noqa: E402
from soup.recipe.spec import recipe_from_dict  # noqa: E402

ARCHS = {**train_speed.ARCHS,
         # DinoV2's ViT code path at test size: 4 blocks, so freeze 0.75 leaves one block and the head to train.
         "tiny": dict(backbone="timm:vit_small_patch14_dinov2", kwargs=dict(depth=4, embed_dim=32, num_heads=2))}
STAGES = ("train", "cook", "eval", "submit")


class Stages:
    """Wall time and peak GPU memory of each stage of one path, printed as each ends."""

    def __init__(self, path: str, device: torch.device):
        self.path, self.device, self.figures = path, device, {}

    def run(self, stage: str, work):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = work()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        self.figures[stage] = {"seconds": seconds, "peak_gib": peak}
        memory = f"peak GPU memory {peak:.2f} GiB" if peak is not None else "peak GPU memory n/a (cpu)"
        print(f"stage: {self.path} {stage}: {seconds:.1f} s, {memory}", flush=True)
        return result


def study_recipe(args, root: Path) -> dict:
    """train_speed's recipe (the reference recipe's optimizer and schedule) with this study's backbone."""
    raw = train_speed.recipe_for(argparse.Namespace(**{**vars(args), "arch": "small"}), root, args.ingredients)
    arch = ARCHS[args.arch]
    raw["model"].update(backbone=arch["backbone"], kwargs={"img_size": args.image_size, **arch["kwargs"]})
    raw["name"] = "study"
    return raw


def soup_command(*args: str) -> None:
    """One `soup ...` command line through soup's CLI, as a fresh process would run it."""
    fast_decoded._DECODED.clear()
    fast_prefix._FEATURES.clear()
    print(f"$ soup {' '.join(args)}", flush=True)
    code = cli.main(list(args), prog_name="soup", standalone_mode=False)
    if code not in (None, 0):
        raise SystemExit(f"soup {args[0]} exited with {code}")


def soup_study(recipe_path: Path, out: Path, stages: Stages) -> dict:
    ckpts, greedy = out / "checkpoints", out / "checkpoints" / "soups" / "greedy.safetensors"
    stages.run("train", lambda: soup_command("train", str(recipe_path), "--out", str(ckpts)))
    stages.run("cook", lambda: soup_command("cook", "--greedy", str(ckpts / "study"), "-o", str(greedy)))
    stages.run("eval", lambda: soup_command("eval", "--ensemble", str(ckpts)))
    stages.run("submit", lambda: soup_command("submit", str(greedy), "-o", str(out / "submission.csv")))
    soup = read_checkpoint(greedy)
    return {"greedy_members": len(soup.meta["members"]), "greedy_val_top1": soup.meta["selection"]["top1"]}


class TestFolder(Dataset):
    """test_images/mistery_category/*, sorted by name, as (image, id) like the seed code's loader."""

    def __init__(self, root: Path, transform):
        self.paths = sorted(p for p in (root / TEST_FOLDER).iterdir() if p.is_file())
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(load_rgb(str(self.paths[index]))), self.paths[index].stem


class SeedStyle:
    """The seed code's loop and its soup by hand; plain torch throughout."""

    def __init__(self, recipe, device: torch.device, amp: str, out: Path):
        self.recipe, self.device, self.out = recipe, device, out
        cuda = device.type == "cuda"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if cuda else None
        d = recipe.data
        self.train_set = ImageFolder(str(Path(d.root) / "train_images"), build_transform(d, train=True))
        val = ImageFolder(str(Path(d.root) / "val_images"), build_transform(d))
        workers = recipe.train.num_workers
        self.val_loader = DataLoader(val, batch_size=recipe.train.batch_size * 2, num_workers=workers, pin_memory=cuda)
        self.val_targets = torch.tensor(val.targets)
        self.test_loader = DataLoader(TestFolder(Path(d.root), build_transform(d)), batch_size=recipe.train.batch_size * 2,
                                      num_workers=workers)
        self.model = None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def fresh_model(self):
        model = build_model(self.recipe.model, self.train_set.classes, self.recipe.data.image_size)
        freeze_prefix(model.backbone, self.recipe.model.freeze)
        return model.to(self.device)

    def logits(self, model, loader) -> torch.Tensor:
        model.eval()
        with torch.no_grad(), self.autocast():
            return torch.cat([model(x.to(self.device)).float().cpu() for x, _ in loader])

    def val_top1(self, logits: torch.Tensor) -> float:
        return (logits.argmax(1) == self.val_targets).float().mean().item()

    def train(self, seed: int) -> tuple[Path, float]:
        """One ingredient; returns its saved weights and final val accuracy."""
        torch.manual_seed(seed)
        t = self.recipe.train
        model = self.fresh_model()
        loader = DataLoader(self.train_set, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers,
                            pin_memory=self.device.type == "cuda")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=t.lr, momentum=t.momentum,
                                    weight_decay=t.weight_decay)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [t.lr_drop_epoch], t.lr_drop_factor)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        for epoch in range(t.epochs):
            model.train()
            for images, targets in loader:
                images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
                with self.autocast():
                    loss = F.cross_entropy(model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            schedule.step()
            top1 = self.val_top1(self.logits(model, self.val_loader))
            print(f"  seed-style {seed} epoch {epoch + 1}: loss {loss.item():.3f}, val acc {top1:.2%}", flush=True)
        path = self.out / f"ingredient{seed}.pt"
        torch.save(model.state_dict(), path)
        return path, top1

    def scored(self, state: dict) -> float:
        self.model.load_state_dict(state)
        return self.val_top1(self.logits(self.model, self.val_loader))

    def greedy(self, trained: list[tuple[Path, float]]) -> tuple[dict, int, float]:
        """Wortsman et al.'s greedy soup: by val accuracy, each ingredient kept if the mean does not lose."""
        self.model = self.fresh_model()
        ranked = sorted(trained, key=lambda item: -item[1])
        load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
        total = {k: v.float() for k, v in load(ranked[0][0]).items()}
        members, best = 1, ranked[0][1]
        for path, _ in ranked[1:]:
            state = load(path)
            candidate = {k: v + state[k].float() for k, v in total.items()}
            top1 = self.scored({k: v / (members + 1) for k, v in candidate.items()})
            if top1 >= best:
                total, members, best = candidate, members + 1, top1
        return {k: v / members for k, v in total.items()}, members, best

    def evaluate(self, trained: list[tuple[Path, float]], soup: dict) -> dict:
        """Every ingredient, the soup and the ingredients' logit ensemble on val."""
        per_model = []
        for path, _ in trained:
            self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            per_model.append(self.logits(self.model, self.val_loader))
        self.model.load_state_dict(soup)
        return {"ingredients": [self.val_top1(x) for x in per_model], "ensemble": self.val_top1(sum(per_model)),
                "soup": self.val_top1(self.logits(self.model, self.val_loader))}

    def submit(self, soup: dict, path: Path) -> int:
        self.model.load_state_dict(soup)
        ids = [i for _, batch in self.test_loader for i in batch]
        categories = self.logits(self.model, self.test_loader).argmax(1).tolist()
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Id", "Category"])
            writer.writerows(zip(ids, categories))
        return len(ids)


def seed_study(recipe, args, out: Path, stages: Stages) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seed = SeedStyle(recipe, args.device, args.amp, out)
    trained = stages.run("train", lambda: [seed.train(s) for s in range(args.seed_ingredients)])
    soup, members, selected = stages.run("cook", lambda: seed.greedy(trained))
    scores = stages.run("eval", lambda: seed.evaluate(trained, soup))
    stages.run("submit", lambda: seed.submit(soup, out / "submission.csv"))
    return {"greedy_members": members, "greedy_val_top1": selected, "val": scores}


def seed_total(figures: dict, n: int, k: int) -> tuple[float, str]:
    """The seed-style study's total for n ingredients from the stages measured on k (module docstring)."""
    s = {stage: figures[stage]["seconds"] for stage in STAGES}
    if k == n:
        return sum(s.values()), "measured"
    # Greedy scores one candidate soup per ingredient after the first: with one measured there was none, and
    # a candidate costs about one of the eval stage's k + 1 val passes.
    per_candidate, counted = (s["cook"] / (k - 1), f"cook x {n - 1}/{k - 1}") if k > 1 else \
        (s["eval"] / (k + 1), f"{n - 1} candidates x eval/{k + 1}")
    total = s["train"] * n / k + per_candidate * (n - 1) + s["eval"] * (n + 1) / (k + 1) + s["submit"]
    return total, f"estimated for {n} from {k} measured: train x {n}/{k} + {counted} + eval x {n + 1}/{k + 1} + submit"


def parse_args(argv=None):
    parser = train_speed.shape_arguments(__doc__.split("\n\n")[0], ARCHS, 30, "bf16")
    parser.add_argument("--test-images", type=int, default=2000 if torch.cuda.is_available() else 40)
    parser.add_argument("--ingredients", type=int, default=8, help="the sweep's size (seeds), at least 2")
    parser.add_argument("--seed-ingredients", type=int, default=None,
                        help="seed-style ingredients really trained (default: all); the rest is estimated")
    parser.add_argument("--data", type=Path, default=None, help="data folder (generated once, reused)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    args.device, args.augment, args.compile = torch.device(args.device), "none", False
    args.seed_ingredients = min(args.seed_ingredients or args.ingredients, args.ingredients)
    if args.ingredients < 2 or args.seed_ingredients < 1:
        parser.error("--ingredients must be at least 2 and --seed-ingredients at least 1")
    return args


def report(args, soup: Stages, seed: Stages, outcomes: dict) -> dict:
    soup_s = sum(f["seconds"] for f in soup.figures.values())
    seed_s, how = seed_total(seed.figures, args.ingredients, args.seed_ingredients)
    print(f"total: soup {soup_s:.1f} s for {args.ingredients} ingredients "
          f"(greedy kept {outcomes['soup']['greedy_members']}, val {outcomes['soup']['greedy_val_top1']:.2%})")
    print(f"total: seed-style {seed_s:.1f} s ({how}; greedy kept {outcomes['seed']['greedy_members']} of "
          f"{args.seed_ingredients}, val {outcomes['seed']['greedy_val_top1']:.2%})")
    print(f"speedup: {seed_s / soup_s:.2f} (seed-style total / soup total)", flush=True)
    return {"soup": {**soup.figures, "total_seconds": soup_s, **outcomes["soup"]},
            "seed": {**seed.figures, "total_seconds": seed_s, "total_is": how, **outcomes["seed"]},
            "speedup": seed_s / soup_s}


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or Path(tempfile.gettempdir()) / f"soup_study_{args.arch}_{args.image_size}"
    train_speed.make_data(root, args.classes, args.train_per_class, args.val_per_class, args.page, args.test_images)
    out = args.out or Path(tempfile.mkdtemp(prefix="soup_whole_run_"))
    raw = study_recipe(args, root)
    recipe_path = out / "study.yaml"
    out.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(raw))
    device = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
              else f"CPU ({os.cpu_count()} cores)")
    versions = f"torch {torch.__version__} (cuda {torch.version.cuda}), timm {timm.__version__}"
    print(f"device: {device}; {versions}; {raw['model']['backbone']} {raw['model']['kwargs']}, "
          f"freeze {args.freeze}, amp {args.amp}; {args.classes} classes x {args.train_per_class} train images; "
          f"{args.epochs} epochs x batch {args.batch_size}; {args.ingredients} ingredients", flush=True)
    shutil.rmtree(root / ".soup_cache", ignore_errors=True)  # soup's store built inside the timing, cold
    try:
        soup, seed = Stages("soup", args.device), Stages("seed-style", args.device)
        outcomes = {"soup": soup_study(recipe_path, out / "soup", soup)}
        outcomes["seed"] = seed_study(recipe_from_dict({**raw, "sweep": {}}), args, out / "seed", seed)
        figures = report(args, soup, seed, outcomes)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    figures.update(device=device, versions=versions, recipe=raw, seed_ingredients=args.seed_ingredients)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    return figures


if __name__ == "__main__":
    main()
