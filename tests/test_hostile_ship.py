"""Hostile and careless cases of shipping (issue 26): an export killed mid-swap, the Hub unreachable or
refusing, a submission killed between its two files, side logs that cannot be written, odd names in
pictures, cards and CSV files read by people."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import soup.judge.export as export_module
from soup.cli import cli

from conftest import ingredient_path, one_error_line, run_study, tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_sketch_root):
    """Two tiny ResNet ingredients under <work>/checkpoints/tiny/, and one export of each (the references a
    killed export is compared with)."""
    work = tmp_path_factory.mktemp("ship")
    run_study(work, tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1]}))
    for index in (0, 1):
        result = CliRunner().invoke(cli, ["export", str(ingredient_path(work, index)), str(work / f"ref{index}")])
        assert result.exit_code == 0, result.output
    return work


def export_files(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in export_module.EXPORT_FILES if (folder / name).is_file()}


# Item 2: an export is all or nothing -------------------------------------------------------------------

KILLED_EXPORT = """
import os, signal, sys
import soup.judge.staging as staging
point, exchange = sys.argv[1], sys.argv[2]
def reached(where):
    if where == point:
        os.kill(os.getpid(), signal.SIGKILL)
staging._reached = reached
if exchange == "no-exchange":
    staging._exchange = lambda a, b: False
from soup.cli import cli
cli(sys.argv[3:])
"""


def killed_export(study, out, point, exchange="exchange"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_EXPORT, point, exchange, "export",
                           str(ingredient_path(study, 1)), str(out), "--overwrite"], env=env, cwd=study,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr


@pytest.mark.parametrize("point", ["wrote model.safetensors", "wrote config.json", "linked others", "swapped"])
def test_a_killed_overwrite_leaves_the_old_export_or_the_new_one_whole(study, tmp_path, point):
    old, new = export_files(study / "ref0"), export_files(study / "ref1")
    assert old != new and set(old) == set(export_module.EXPORT_FILES)
    out = tmp_path / "out"
    out.mkdir()
    for name, data in old.items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("mine")
    killed_export(study, out, point)
    assert export_files(out) in (old, new)  # never new weights beside the old config and card
    assert (out / "notes.txt").read_text() == "mine"
    # The next export puts right what the kill left (.out.<random>.tmp) and says so.
    result = CliRunner().invoke(cli, ["export", str(ingredient_path(study, 1)), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "interrupted export" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert export_files(out) == new and (out / "notes.txt").read_text() == "mine"


def test_a_kill_between_the_two_renames_is_put_right_by_the_next_export(study, tmp_path):
    """Where the file system cannot exchange two names, the old folder moves away and the new one in: a kill
    between them leaves both whole beside a missing DIR, which the next export puts back before its checks."""
    out = tmp_path / "out"
    out.mkdir()
    for name, data in export_files(study / "ref0").items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("mine")
    killed_export(study, out, "moved away", "no-exchange")
    assert not out.exists() and len(list(tmp_path.iterdir())) == 2
    result = CliRunner().invoke(cli, ["export", str(ingredient_path(study, 0)), str(out)])
    one_error_line(result, "exists and is not empty", "--overwrite")  # DIR is back: nothing replaced unasked
    assert export_files(out) == export_files(study / "ref1") and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
