"""`soup sketches` and `soup demo`: generated data and the whole path on it."""

from __future__ import annotations

from pathlib import Path

import click

from soup.data.sketches import generate_sketches
from soup.demo import run_demo
from soup.cli import base
from soup.cli.base import cli, read_more


@cli.command(epilog=read_more("docs/recipes.md"))
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", default=8, show_default=True, help="Number of shape classes (at most 16).")
@click.option("--train-per-class", default=150, show_default=True)
@click.option("--val-per-class", default=25, show_default=True)
@click.option("--test-images", default=100, show_default=True)
@click.option("--image-size", default=64, show_default=True, help="Smallest page size in pixels.")
@click.option("--seed", default=0, show_default=True)
def sketches(root, classes, train_per_class, val_per_class, test_images, image_size, seed):
    """Generate a sketch data set in the course's folder layout under ROOT."""
    names = generate_sketches(root, classes, train_per_class, val_per_class, test_images, image_size, seed)
    base.console.print(f"wrote {len(names)} classes ({', '.join(names)}) to {root}")


@cli.command(epilog=read_more("README.md"))
@click.option("--out", default="soup_demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--small", is_flag=True, hidden=True, help="A smaller, faster demo (for tests).")
def demo(out, small):
    """Everything on generated sketches, offline, on a CPU: pretrain, fine-tune, cook, eval, submit."""
    run_demo(out, base.console, small=small)

