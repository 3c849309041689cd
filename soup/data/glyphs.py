"""Procedural stroke characters: the pretraining set of soup's shipped start (soup/assets/).

A class is a seeded template of 1-4 strokes (straight lines, cubic curves, arcs of ellipses and hooks) in
the unit square; an instance is that template redrawn by another hand: each control point moved a little,
the whole glyph scaled, rotated, sheared and shifted, another pen width, and now and then a gap where the
pen lifted. Grey pages of uneven tone with pencil-grey ink, stored in memory, 32 px by default.

Its domain is not the demo's: the sketches of soup/data/sketches.py are 16 named geometric shapes on white
smudged pages; these are hundreds of made-up characters, none of which draws a circle, star or house by
design (the shapes are random curves). What carries over is what pretraining at scale gives a backbone:
strokes, their junctions and layouts, seen under jitter.

Everything is drawn from numpy generators seeded by (seed, class, split): the same arguments give the same
bytes, one class's pages do not depend on how many other classes are drawn, and train and val are drawn
apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from soup.errors import SoupError

SPLITS = {"train": 1, "val": 2}
POINTS = 14  # samples along each stroke
SUPERSAMPLE = 2  # drawn at twice the size, then averaged down: smooth edges at 32 px


@dataclass(frozen=True)
class GlyphSet:
    images: np.ndarray  # uint8 (n, size, size), grey
    labels: np.ndarray  # int64 (n,), class index
    classes: int
    seed: int
    split: str


def _bezier(controls: np.ndarray) -> np.ndarray:
    """Points along cubic Bezier curves: controls (..., 4, 2) -> (..., POINTS, 2)."""
    t = np.linspace(0.0, 1.0, POINTS)[:, None]
    basis = np.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3])  # (4, POINTS, 1)
    return np.einsum("kp,...kc->...pc", basis[..., 0], controls)


def _stroke(rng: np.random.Generator) -> np.ndarray:
    """One stroke of a template as the 4 control points of a cubic curve in [-1, 1]^2."""
    kind = rng.choice(4, p=[0.3, 0.35, 0.2, 0.15])
    if kind == 0:  # straight line: controls on the segment
        a, b = rng.uniform(-0.9, 0.9, (2, 2))
        return np.stack([a + (b - a) * f for f in (0.0, 1 / 3, 2 / 3, 1.0)])
    if kind == 1:  # free curve
        return rng.uniform(-0.9, 0.9, (4, 2))
    if kind == 2:  # arc of an ellipse, up to most of a loop
        centre = rng.uniform(-0.4, 0.4, 2)
        radii = rng.uniform(0.25, 0.6, 2)
        start, sweep = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.8) * np.pi
        angles = start + sweep * np.array([0.0, 1 / 3, 2 / 3, 1.0])
        ring = centre + radii * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        # Through-points -> Bezier controls that pass near them (Catmull-Rom-like pull).
        return np.stack([ring[0], 2 * ring[1] - (ring[0] + ring[2]) / 2,
                         2 * ring[2] - (ring[1] + ring[3]) / 2, ring[3]])
    # hook: a line that turns sharply at its end
    a, b = rng.uniform(-0.8, 0.8, (2, 2))
    turn = b + rng.uniform(-0.5, 0.5, 2)
    return np.stack([a, (a + b) / 2, b, turn])


def glyph_templates(classes: int, seed: int) -> list[np.ndarray]:
    """Each class's strokes: an array (strokes, 4, 2) of cubic control points."""
    templates = []
    for c in range(classes):
        rng = np.random.default_rng([seed, c, 0])
        count = rng.choice([1, 2, 3, 4], p=[0.15, 0.4, 0.3, 0.15])
        templates.append(np.stack([_stroke(rng) for _ in range(count)]))
    return templates


def _instances(template: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` jittered copies of a template's stroke points in page units [0, 1]: (count, strokes, POINTS, 2)."""
    strokes = template.shape[0]
    controls = template[None] + rng.normal(0, 0.07, (count, strokes, 4, 2))
    points = _bezier(controls)
    angle = rng.uniform(-0.3, 0.3, count)
    shear = rng.uniform(-0.2, 0.2, count)
    scale = rng.uniform(0.3, 0.45, (count, 2))
    cos, sin = np.cos(angle), np.sin(angle)
    # rotation @ shear @ scale, per instance
    matrix = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    matrix = matrix @ np.stack([np.stack([np.ones(count), shear], -1),
                                np.stack([np.zeros(count), np.ones(count)], -1)], -2)
    matrix = matrix * scale[:, None, :]
    centre = 0.5 + rng.uniform(-0.08, 0.08, (count, 1, 1, 2))
    return np.einsum("nij,nspj->nspi", matrix, points) + centre


def _render(points: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw each instance's strokes (count, strokes, POINTS, 2) on a page: uint8 (count, size, size)."""
    count, strokes = points.shape[:2]
    big = size * SUPERSAMPLE
    paper = rng.integers(175, 256, count)
    ink = rng.integers(0, 110, count)
    width = rng.integers(2, 6, count)  # at the supersampled size
    lift = rng.random((count, strokes)) < 0.25
    cut = rng.integers(3, POINTS - 4, (count, strokes))
    gap = rng.integers(1, 3, (count, strokes))
    pages = np.empty((count, size, size), np.uint8)
    for n in range(count):
        page = Image.new("L", (big, big), int(paper[n]))
        pen = ImageDraw.Draw(page)
        for s in range(strokes):
            line = [tuple(p) for p in (points[n, s] * big).tolist()]
            pieces = [line[:cut[n, s]], line[cut[n, s] + gap[n, s]:]] if lift[n, s] else [line]
            for piece in pieces:
                pen.line(piece, fill=int(ink[n]), width=int(width[n]), joint="curve")
        pages[n] = np.asarray(page.reduce(SUPERSAMPLE))
    # Uneven paper: a tone gradient across the page and grain.
    ramp = np.linspace(-1.0, 1.0, size)
    tilt = rng.uniform(-12, 12, (count, 2))
    shade = tilt[:, 0, None, None] * ramp[None, :, None] + tilt[:, 1, None, None] * ramp[None, None, :]
    grain = rng.normal(0, 4, (count, size, size))
    return np.clip(pages + shade + grain, 0, 255).astype(np.uint8)


def generate_glyphs(classes: int = 600, per_class: int = 40, size: int = 32, seed: int = 0,
                    split: str = "train") -> GlyphSet:
    """`per_class` pages of each of `classes` characters; the same arguments give the same bytes."""
    if split not in SPLITS:
        raise SoupError(f"glyph split {split!r}: choose one of {', '.join(SPLITS)}")
    if classes < 1 or per_class < 1 or not 8 <= size <= 512:
        raise SoupError(f"glyphs: classes and per_class must be >= 1 and size in [8, 512] (got {classes}, "
                        f"{per_class}, {size})")
    images = np.empty((classes * per_class, size, size), np.uint8)
    for c, template in enumerate(glyph_templates(classes, seed)):
        rng = np.random.default_rng([seed, c, SPLITS[split]])
        images[c * per_class:(c + 1) * per_class] = _render(_instances(template, per_class, rng), size, rng)
    labels = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    return GlyphSet(images, labels, classes, seed, split)
