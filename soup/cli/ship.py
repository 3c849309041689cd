"""`soup submit` and `soup export`: parse and call soup.ship."""

from __future__ import annotations

from pathlib import Path

import click

from soup.ship.export import export_checkpoint, push_folder
from soup.ship.submit import (DEFAULT_FORMAT, FORMATS, check_submission_output, predict_submission,
                              submission_writer, write_submission_pair)
from soup.models.checkpoint import read_checkpoint
from soup.models.views import parse_tta
from soup.text import shown
from soup.cli import base
from soup.cli.base import TTA_OPTION, cli, read_more, trust_hub_option


@cli.command(epilog=read_more("docs/shipping.md"))
@trust_hub_option
@click.argument("checkpoint_paths", metavar="CKPT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Data root holding test_images/mistery_category/ (default: the recipe's data.root).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="submission.csv",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing submission (never a checkpoint).")
@click.option("--ensemble", is_flag=True, help="Average several checkpoints (architectures may differ, classes "
              "may not); the members are listed in <output>.json.")
@click.option("--format", "fmt", metavar="NAME", default=DEFAULT_FORMAT, show_default=True,
              help=f"Submission format: {', '.join(FORMATS)} (see docs/shipping.md).")
@TTA_OPTION
def submit(checkpoint_paths, data_root, output, overwrite, ensemble, tta, fmt):
    """Write Id,Category predictions for the test images (or another --format)."""
    submission_writer(fmt)  # an unknown format stops the command before any work
    tta = parse_tta(tta)
    checkpoints = [read_checkpoint(p) for p in checkpoint_paths]
    found = check_submission_output(output, checkpoints, overwrite, data_root)
    if found:
        base.console.print(f"note: {shown(found)}; both are written again")
    ids, categories, provenance = predict_submission(checkpoints, data_root, ensemble, tta)
    sidecar = write_submission_pair(output, ids, categories, provenance, checkpoints[0].classes, fmt)
    what = f"the ensemble ({provenance['combined']}) of {len(checkpoints)} checkpoints" if ensemble else "1 checkpoint"
    base.console.print(f"wrote {shown(output)}: {len(ids)} predictions from {what}; provenance in {shown(sidecar)}")


@cli.command(name="export", epilog=read_more("docs/shipping.md"))
@trust_hub_option
@click.argument("checkpoint_path", metavar="CKPT", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace the export's files in a non-empty DIR (nothing else "
              "in it; never an ingredient's folder or the data root).")
@click.option("--push", "repo_id", default=None, metavar="OWNER/NAME",
              help="Then upload DIR to this Hugging Face Hub model repo (needs pip install 'soup[hub]').")
def export_command(checkpoint_path, folder, overwrite, repo_id):
    """Write CKPT as timm ships models: DIR/model.safetensors (timm's key names), config.json and a model
    card README.md; loads with timm.create_model("local-dir:DIR", pretrained=True)."""
    checkpoint = read_checkpoint(checkpoint_path)
    export = export_checkpoint(checkpoint, folder, overwrite, repo_id)
    for note in export.notes:
        base.console.print(f"note: {shown(note)}")
    base.console.print(f"wrote {shown(folder)}: {export.architecture} with {len(checkpoint.classes)} classes "
                  "(model.safetensors, config.json, README.md); checked against the checkpoint's own logits")
    if repo_id:
        base.console.print(f"pushed to {push_folder(folder, repo_id)}")

