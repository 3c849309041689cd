"""The start soup ships: a small DinoV2-architecture ViT pretrained on procedural stroke characters
(benchmarks/pretrain_start.py made it; docs/start.md). Its file and provenance are package data, written
by the project, so reading the provenance here trusts no stranger's file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GLYPH_START = ASSETS / "glyph_vit.safetensors"


@dataclass(frozen=True)
class ShippedStart:
    weights: Path
    backbone: str  # a model.backbone spec
    kwargs: dict  # model.kwargs that rebuild the architecture the weights fit
    image_size: int  # the size it was pretrained at
    val_top1: float  # on its own pretraining set's val split
    sha256: str

    def model_section(self, **extra) -> dict:
        """A recipe's `model:` section that starts from this file."""
        return {"backbone": self.backbone, "pretrained": False, "weights": str(self.weights),
                "kwargs": dict(self.kwargs), **extra}


def glyph_start() -> ShippedStart:
    record = json.loads(GLYPH_START.with_suffix(".json").read_text(encoding="utf-8"))
    return ShippedStart(GLYPH_START, record["backbone"], record["kwargs"], record["data"]["image_size"],
                        record["val_top1"], record["sha256"])
