"""The run folder's layout has one home (issue 32): soup/models/runs.py names every file a run leaves, and
no other module spells those names; its lock probe sees a lock another process holds."""

import ast
import fcntl
import subprocess
import sys
import textwrap
from pathlib import Path

from soup.models import runs

PACKAGE = Path(__file__).resolve().parents[2] / "soup"
# Names only a run folder uses ("model.safetensors" is also timm's and the Hub's weights file: not checked).
RUN_NAMES = {runs.STATE_FILE, runs.LOCK_FILE, runs.METRICS_FILE, runs.SUMMARY_FILE, runs.SOUPS_FILE,
             runs.LOGS_LOCK, runs.RUNGS_DIR}


def test_no_module_but_runs_spells_a_run_file_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "models" / "runs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in RUN_NAMES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    assert not found, "spell these through soup.models.runs:\n" + "\n".join(found)


def test_the_paths_follow_the_layout(tmp_path):
    assert runs.ingredient_file(tmp_path, "tiny", "00-seed0") == tmp_path / "tiny" / "00-seed0" / "model.safetensors"
    assert runs.rung_file(tmp_path / "tiny", 3, "01-seed1") == tmp_path / "tiny" / "rungs" / "epoch-3" / "01-seed1.json"
    assert runs.default_soup_file("greedy") == Path("checkpoints") / "soups" / "greedy.safetensors"


def test_the_lock_probe_sees_a_lock_held_by_another_process(tmp_path):
    assert not runs.lock_held(tmp_path)  # no lock file: nobody trains there
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys
        handle = open({str(tmp_path / runs.LOCK_FILE)!r}, "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert runs.lock_held(tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not runs.lock_held(tmp_path)  # the holder is gone, its lock with it
    with open(tmp_path / runs.LOCK_FILE) as handle:  # the probe itself leaves no lock behind
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
