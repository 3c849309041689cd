"""The search from the start soup ships (`--backbone glyph-vit` of soup_gain.py and prune_gain.py): the
fine-tuning recipe benchmarks/start_worth.py chose on another draw of the sketches, and the options that
change its search space for a trial."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from soup.models.starts import glyph_start
from soup.recipe.spec import AUGMENTS

GLYPH_VIT = "glyph-vit"  # the shipped start (soup/assets/glyph_vit.safetensors, docs/start.md)
# At the shipped start the augmentation is start_worth.py's choice (crop_hflip); the draws differ in lr,
# weight decay, label smoothing and seed.
GLYPH_SPACE = {
    "train.weight_decay": {"choice": [0.0, 0.01, 0.05]},
    "train.label_smoothing": {"uniform": [0.0, 0.2]},
    "train.seed": {"randint": [0, 999]},
}


def glyph_recipe(args, root: Path, name: str, search: dict) -> dict:
    """A search from the shipped glyph ViT, with the fine-tuning recipe benchmarks/start_worth.py chose on
    another draw of the sketches (LP-FT, cosine, crop_hflip, label smoothing); `search` adds trials, seed
    and pruning to the space (lr band, weight decay, label smoothing, seed)."""
    start = glyph_start()
    model = start.model_section(freeze=args.freeze, probe={"epochs": 50, "lr": 3e-3, "optimizer": "adamw"})
    train = {"epochs": args.epochs, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05,
             "amp": "off", "num_workers": 0, "schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.1}
    space = {"train.lr": {"loguniform": list(args.lr)}, **GLYPH_SPACE}
    if len(args.augments) > 1:  # the model-soups paper's ingredients differ in augmentation too
        space["data.augment"] = {"choice": list(args.augments)}
    for key, text in args.space:
        try:
            space[key] = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--space {key}: {text!r} is not JSON ({err.msg}); e.g. '{{\"choice\": [0, 0.2]}}'")
    return {"name": name, "data": {"root": str(root), "image_size": start.image_size, "augment": args.augments[0]},
            "model": model, "train": train, "search": {"space": space, **search}}


def add_glyph_options(parser: argparse.ArgumentParser) -> None:
    """The search-space options of glyph_recipe (soup_gain.py and prune_gain.py)."""
    parser.add_argument("--augments", nargs="+", choices=AUGMENTS, default=["crop_hflip"],
                        help="glyph-vit: data.augment, or the search's choices when several")
    parser.add_argument("--space", nargs=2, action="append", default=[], metavar=("KEY", "JSON"),
                        type=str, help="glyph-vit: one more search-space entry, e.g. train.mixup "
                                       "'{\"choice\": [0, 0.2]}' (repeatable); the recipe checks it")


def regime(args, freeze: bool = False) -> str:
    """Which start a benchmark's figures come from: the shipped one, or one pretrained here briefly."""
    said = (f"the shipped start {glyph_start().weights.name} (sha256 {glyph_start().sha256[:12]}) at "
            f"{glyph_start().image_size} px" if args.backbone == GLYPH_VIT else
            f"{args.backbone} pretrained here on clean pages at {args.image_size} px")
    return said + (f", freeze {args.freeze}" if freeze else "")
