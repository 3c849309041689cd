"""Sketch-like images made here, so that tests and the demo need no download.

Each class is a shape drawn as wobbly strokes on white paper; position, size, rotation, stroke width, wobble,
gaps and stray marks vary strongly within a class, as freehand sketches do. Images are grey, stored as RGB
JPEG, in the course's folder layout.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from soup.errors import SoupError


def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n + 1)]


def _star(n: int) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n + 1):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + math.pi * k / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _spiral() -> list[tuple[float, float]]:
    return [(t / 40 * math.cos(t / 4), t / 40 * math.sin(t / 4)) for t in range(41)]


def _wave() -> list[tuple[float, float]]:
    return [(-1 + t / 20, 0.5 * math.sin(t / 20 * 3 * math.pi)) for t in range(41)]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(41):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17))
    return pts


# Each shape is a list of strokes; a stroke is a polyline in the unit square [-1, 1]².
SHAPES: dict[str, list[list[tuple[float, float]]]] = {
    "circle": [_regular(32)],
    "square": [_regular(4, math.pi / 4)],
    "triangle": [_regular(3, -math.pi / 2)],
    "star": [_star(5)],
    "cross": [[(-1, 0), (1, 0)], [(0, -1), (0, 1)]],
    "spiral": [_spiral()],
    "wave": [_wave()],
    "house": [[(-0.8, 1), (-0.8, -0.1), (0.8, -0.1), (0.8, 1), (-0.8, 1)], [(-1, -0.1), (0, -1), (1, -0.1)]],
    "arrow": [[(-1, 0), (1, 0)], [(0.4, -0.5), (1, 0), (0.4, 0.5)]],
    "heart": [_heart()],
    "zigzag": [[(-1, 0.5), (-0.5, -0.5), (0, 0.5), (0.5, -0.5), (1, 0.5)]],
    "hexagon": [_regular(6)],
    "eye": [[(-1, 0), (0, -0.6), (1, 0), (0, 0.6), (-1, 0)], _regular(16)[:17]],
    "ladder": [[(-0.5, -1), (-0.5, 1)], [(0.5, -1), (0.5, 1)]] + [[(-0.5, y), (0.5, y)] for y in (-0.6, 0, 0.6)],
    "sun": [[(0.45 * x, 0.45 * y) for x, y in _regular(16)]]
    + [[(0.6 * math.cos(a), 0.6 * math.sin(a)), (math.cos(a), math.sin(a))] for a in [k * math.pi / 4 for k in range(8)]],
    "moon": [[(math.cos(a), math.sin(a)) for a in [math.pi / 2 + k * math.pi / 16 for k in range(17)]]
             + [(0.4 + 0.6 * math.cos(a), 0.8 * math.sin(a)) for a in [3 * math.pi / 2 - k * math.pi / 16 for k in range(17)]]],
}


def _interpolate(stroke, steps: int = 6):
    out = []
    for (x0, y0), (x1, y1) in zip(stroke, stroke[1:]):
        for s in range(steps):
            t = s / steps
            out.append((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t))
    out.append(stroke[-1])
    return out


def draw_sketch(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One freehand-looking drawing of `shape` on a `size`×`size` white page, as an RGB image."""
    image = Image.new("L", (size, size), 255)
    pen = ImageDraw.Draw(image)
    scale = size * rng.uniform(0.22, 0.42)
    cx = size / 2 + rng.uniform(-0.15, 0.15) * size
    cy = size / 2 + rng.uniform(-0.15, 0.15) * size
    angle = rng.uniform(-0.6, 0.6)
    squash = rng.uniform(0.75, 1.25)
    width = max(1, round(size * rng.uniform(0.012, 0.04)))
    wobble = rng.uniform(0.01, 0.06)
    ink = rng.randint(0, 90)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    for stroke in SHAPES[shape]:
        points = []
        for x, y in _interpolate(stroke):
            x, y = x * squash + rng.gauss(0, wobble), y / squash + rng.gauss(0, wobble)
            points.append((cx + scale * (x * cos_a - y * sin_a), cy + scale * (x * sin_a + y * cos_a)))
        # A gap where the pen lifted, now and then.
        if len(points) > 8 and rng.random() < 0.3:
            cut = rng.randrange(2, len(points) - 2)
            pen.line(points[:cut], fill=ink, width=width, joint="curve")
            pen.line(points[cut + 1:], fill=ink, width=width, joint="curve")
        else:
            pen.line(points, fill=ink, width=width, joint="curve")
    for _ in range(rng.randint(0, 2)):  # stray marks
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        pen.line([(x, y), (x + rng.uniform(-0.1, 0.1) * size, y + rng.uniform(-0.1, 0.1) * size)],
                 fill=ink, width=max(1, width // 2))
    return image.convert("RGB")


def distort(image: Image.Image, rng: random.Random) -> Image.Image:
    """A scanned, smudged page: a block of the drawing erased now and then, speckle, and sometimes blur.
    Makes a small data set hard enough that models trained on it disagree."""
    size = min(image.size)
    pen = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        w, h = rng.randint(size // 8, size // 3), rng.randint(size // 8, size // 3)
        x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
        pen.rectangle([x, y, x + w, y + h], fill="white")
    for _ in range(rng.randint(0, size // 4)):
        pen.point((rng.randrange(image.width), rng.randrange(image.height)), fill=(rng.randint(0, 120),) * 3)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return image


def generate_sketches(root: str | Path, classes: int | list[str] = 8, train_per_class: int = 20,
                      val_per_class: int = 5, test_images: int = 20, image_size: int = 64,
                      seed: int = 0, distorted: bool = False) -> list[str]:
    """Write a sketch data set in the course layout under `root`; returns the class names (sorted).
    `distorted`: every page also goes through `distort` (a harder set; the same seed draws other pages)."""
    names = list(SHAPES)[:classes] if isinstance(classes, int) else list(classes)
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        raise SoupError(f"unknown sketch classes {unknown}; choose from {', '.join(SHAPES)}")
    if isinstance(classes, int) and classes > len(SHAPES):
        raise SoupError(f"at most {len(SHAPES)} sketch classes can be generated, asked for {classes}")
    rng = random.Random(seed)
    root = Path(root)

    def page_size() -> int:
        # Real sketches come in many sizes; resizing is part of what is tested.
        return rng.randint(image_size, image_size * 3 // 2)

    def page(name: str) -> Image.Image:
        drawing = draw_sketch(name, page_size(), rng)
        return distort(drawing, rng) if distorted else drawing

    for split, count in (("train_images", train_per_class), ("val_images", val_per_class)):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                page(name).save(folder / f"{name}_{k:04d}.jpeg", quality=90)
    test_folder = root / "test_images" / "mistery_category"
    test_folder.mkdir(parents=True, exist_ok=True)
    for k in range(test_images):
        page(rng.choice(names)).save(test_folder / f"img_{k:05d}.jpeg", quality=90)
    return sorted(names)
