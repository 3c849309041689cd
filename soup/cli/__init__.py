"""The `soup` command: parses arguments and calls the stage that owns the work, one module per group of
commands (train, cook, judge: eval/calibrate/inspect/plot/report, ship: submit/export, make: sketches/demo)
on the group and options they share (base).

Every stage is imported at the top: the flags of `soup cook` come from the method registry, so loading the
CLI loads torch anyway. The console script (soup.__main__) installs its signal handlers before importing
this package, so a Ctrl-C during those seconds is still one line."""

from __future__ import annotations

# Importing each command module registers its commands on the group.
from soup.cli import cook, imports, judge, make, ship, train  # noqa: F401
from soup.cli.base import cli


def main():
    cli(prog_name="soup")
