"""`soup import`: parse and call soup.outside."""

from __future__ import annotations

from pathlib import Path

import click

from soup.models.runs import OUT_DIR
from soup.outside.importing import import_checkpoints
from soup.outside.settings import parse_given
from soup.text import shown
from soup.cli import base
from soup.cli.base import cli, read_more, trust_hub_option


@cli.command("import", epilog=read_more("docs/importing.md"))
@click.argument("sources", metavar="SOURCE...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path),
              help="Data root the sources were fine-tuned on: its classes must be their heads'.")
@click.option("--model", default=None, metavar="BACKBONE",
              help="Architecture, as a timm name or soup's timm:NAME / hub:SOURCE:ENTRY (default: what the sources "
              "record: timm's args, config.json, Lightning's hyper_parameters).")
@click.option("--start", default=None, metavar="FILE|pretrained",
              help="The weights the sources were fine-tuned from: a checkpoint or state dict, or `pretrained` (the "
              "architecture's pretrained weights, rebuilt by name). Without it the start is unknown: cooking's "
              "start check is off and Model Stock, --interpolate B and inspect's distances refuse.")
@click.option("--ema", is_flag=True, help="Take the EMA weights (timm's state_dict_ema) instead of the trained ones.")
@click.option("--strip-prefix", default=None, metavar="P",
              help="Strip this prefix from every tensor name (default: found, e.g. a Lightning module's `model.`).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path(OUT_DIR),
              show_default=True, help="Folder the ingredients go under, as OUT/NAME/NN-SOURCE/model.safetensors.")
@click.option("--name", default="imported", show_default=True, help="The ingredients' recipe name (a folder).")
@trust_hub_option
@click.option("--image-size", default=None, metavar="PX",
              help="The side the sources were fed at (default: what they record, the size a ViT's position "
              "embedding fixes, else timm's pretrained_cfg, said in one line).")
@click.option("--mean", default=None, metavar="R,G,B", help="The normalisation mean they were trained with (default "
              "as for --image-size).")
@click.option("--std", default=None, metavar="R,G,B", help="The normalisation std they were trained with (default "
              "as for --image-size).")
def import_command(sources, data_root, model, start, ema, strip_prefix, out, name, image_size, mean, std):
    """Write checkpoints made by other tools (timm train.py, Lightning, plain PyTorch, Hub folders) as soup
    ingredients, checked against the model and the data root first."""
    given = parse_given(image_size, mean, std)
    written = import_checkpoints(list(sources), data_root, model, start, ema, strip_prefix, out, name, base.console,
                                 given)
    base.console.print(f"wrote {len(written)} ingredient{'s' if len(written) != 1 else ''} under "
                       f"{shown(Path(out) / name)}; cook them with `soup cook {shown(Path(out) / name)}`")
