"""What every command shares: the group that turns a user mistake into one line, the console, the
--help epilogue, the --trust-hub and --tta options and how checkpoints are found by default."""

from __future__ import annotations

import functools

import click
from rich.console import Console

from soup.errors import SoupError, interrupt_on_signals, one_line
from soup.models.backbones import trusting_hubs
from soup.models.distributed import RankError, is_main
from soup.models.checkpoint import find_checkpoints
from soup.models.runs import OUT_DIR
from soup.text import one_notice_each, shown

console = Console(highlight=False)


def read_more(page: str) -> str:
    """The line that ends a command's --help: the page that documents it."""
    return f"Read more: {page} in soup's source tree."


class SoupGroup(click.Group):
    """Turns a user mistake into one line on stderr and exit code 2, never a traceback; Ctrl-C or SIGTERM
    into one line and exit code 130. Under torchrun rank 0 prints the line, except for a RankError (one
    rank's own GPU or connection), which the rank that meets it prints. Each notice that something optional
    is off is said once per command."""

    def invoke(self, ctx):
        try:
            with interrupt_on_signals(), one_notice_each():
                return super().invoke(ctx)
        except SoupError as err:
            if isinstance(err, RankError) or _main_rank():
                click.echo(f"soup: error: {one_line(err)}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            if _main_rank():
                click.echo("soup: interrupted", err=True)
            ctx.exit(130)


def _main_rank() -> bool:
    """Under torchrun every rank meets the same mistake in its input: rank 0 alone says it (every rank exits
    non-zero). A rank the environment cannot place says it too."""
    try:
        return is_main()
    except SoupError:
        return True


@click.group(cls=SoupGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="soup")
def cli():
    """Fine-tune pretrained backbones several times and cook model soups from the results."""


def trust_hub_option(fn):
    """--trust-hub: the only way a checkpoint's recorded torch.hub backbone may run its code (besides a copy
    torch.hub already cached), since a checkpoint may come from anyone."""

    @click.option("--trust-hub", "trust_hub", multiple=True, metavar="DIR|OWNER/REPO",
                  help="Run the torch.hub code of this folder or GitHub repo when a checkpoint names it as its "
                  "backbone (repeatable); without it, only timm models and the torch.hub cache's copies.")
    @functools.wraps(fn)
    def command(*args, trust_hub=(), **kwargs):
        with trusting_hubs(trust_hub):
            return fn(*args, **kwargs)
    return command


def warn(message: str) -> None:
    console.print(f"[yellow]warning[/]: {shown(message)}")


def named_or_default(paths, kinds: set[str] | None = None):
    """The checkpoints named, or by default those under checkpoints/ (of `kinds` only, if given)."""
    checkpoints = find_checkpoints(list(paths) or [OUT_DIR], kinds=None if paths else kinds, warn=warn)
    if not checkpoints:
        raise SoupError("no checkpoints found; train with `soup train RECIPE` or name checkpoint files")
    return checkpoints


TTA_OPTION = click.option(
    "--tta", default=None, metavar="flip|flip,crops",
    help="Test-time augmentation: average the logits over the image and its mirror (flip), plus 4 corner and "
    "1 centre crops of 87.5% of the side resized back (flip,crops).")

