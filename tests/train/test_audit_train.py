"""Issue 10's training findings: finishing races and crashes, write failures, fsync, stale temporary files,
recipe values that used to crash later, expansion caps, and interrupts before the training loop."""

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from rich.console import Console
from torch import nn

import soup.train.state
import soup.train.loop
from soup.cli import cli
from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.models.files import write_text_atomic
from soup.models.runs import INGREDIENT_FILE, METRICS_FILE, STATE_FILE
from soup.recipe.spec import expand_sweep, load_recipe, recipe_from_dict
from soup.train.loop import train_ingredient
from soup.train.state import METRICS_KEYS, ingredient_lock, save_state

from conftest import run_files, tiny_recipe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
META = {"kind": "ingredient", "recipe": {}, "backbone": "b", "classes": ["a"], "start_fingerprint": "f"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_sketch_root):
    """One finished ingredient (recipe, run folder) that tests copy instead of training again."""
    recipe = tiny_recipe(small_sketch_root)
    out = tmp_path_factory.mktemp("trained")
    [ingredient] = expand_sweep(recipe_from_dict(recipe))
    train_ingredient(ingredient, out, Console(file=io.StringIO()))
    return recipe, out / "tiny" / "00"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=300)


def write_recipe(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# --- finishing: lock first, idempotent, stale temporary files ----------------------------------------


def test_a_run_that_waited_for_the_lock_sees_the_finished_checkpoint(trained, tmp_path, monkeypatch):
    recipe, done = trained
    [ingredient] = expand_sweep(recipe_from_dict(recipe))
    run_dir = tmp_path / "tiny" / "00"
    first = contextlib.ExitStack()
    first.enter_context(ingredient_lock(run_dir))  # the first process, in its last epoch
    real_flock = fcntl.flock

    def first_finishes_meanwhile(handle, operation):
        # The second process asks for the lock just as the first one writes its checkpoint and exits.
        if not (run_dir / INGREDIENT_FILE).exists():
            for name in (INGREDIENT_FILE, METRICS_FILE):
                shutil.copy(done / name, run_dir / name)
            first.close()
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", first_finishes_meanwhile)
    console = quiet()
    assert train_ingredient(ingredient, tmp_path, console, resume=True) == run_dir / INGREDIENT_FILE
    assert (run_dir / INGREDIENT_FILE).read_bytes() == (done / INGREDIENT_FILE).read_bytes()
    assert "finished already, skipped" in console.file.getvalue()


def test_a_kill_right_after_the_checkpoint_rename_is_finished_by_resume(trained, small_sketch_root, tmp_path,
                                                                        monkeypatch):
    [ingredient] = expand_sweep(recipe_from_dict(tiny_recipe(small_sketch_root)))
    run_dir = tmp_path / "tiny" / "00"
    real_save = soup.train.loop.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(soup.train.loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_ingredient(ingredient, tmp_path, quiet())
    assert run_files(run_dir) == [".lock", INGREDIENT_FILE, STATE_FILE]
    monkeypatch.undo()

    written = (run_dir / INGREDIENT_FILE).read_bytes()
    console = quiet()
    train_ingredient(ingredient, tmp_path, console, resume=True)
    assert "finished already, skipped (wrote the missing metrics.json; removed the stale state.pt)" in \
        console.file.getvalue()
    assert run_files(run_dir) == [".lock", METRICS_FILE, INGREDIENT_FILE]
    assert (run_dir / INGREDIENT_FILE).read_bytes() == written
    meta = read_checkpoint(run_dir / INGREDIENT_FILE).meta
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    assert metrics == {**{k: meta[k] for k in METRICS_KEYS}, **meta["run"]}
    # The same fields, in the same order, as the metrics.json of a run that was never killed.
    assert list(metrics) == list(json.loads((trained[1] / METRICS_FILE).read_text()))


def test_stale_temporary_files_of_the_ingredient_are_removed_under_its_lock(trained, tmp_path):
    recipe, done = trained
    [ingredient] = expand_sweep(recipe_from_dict(recipe))
    run_dir, neighbour = tmp_path / "tiny" / "00", tmp_path / "tiny" / "01"
    shutil.copytree(done, run_dir)
    neighbour.mkdir()
    stale = [run_dir / ".state.pt.k2j3h4.tmp", run_dir / ".model.safetensors.x8y9z0.tmp"]
    kept = [run_dir / "notes.txt", neighbour / ".state.pt.a1b2c3.tmp"]  # not a temp file / not this ingredient
    for path in stale + kept:
        path.write_bytes(b"half a file")

    with ingredient_lock(run_dir):  # a live writer: its temporary files are not touched
        with pytest.raises(SoupError, match="another process is training this ingredient"):
            train_ingredient(ingredient, tmp_path, quiet(), resume=True)
    assert all(path.exists() for path in stale)

    train_ingredient(ingredient, tmp_path, quiet(), resume=True)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


# --- atomic writes: fsync, and every write failure is one line -----------------------------------------


def _state(path):
    model = nn.Linear(200, 500)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 200)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    save_state(path, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), schedule, 1, [], {})


WRITERS = {
    "checkpoint": lambda path: save_checkpoint(path, {"w": torch.ones(100_000)}, META),  # soups too
    "state": _state,
    "text": lambda path: write_text_atomic(path, "x" * 100_000),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_atomic_writes_sync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch, writer):
    target = tmp_path / "out.bin"
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    WRITERS[writer](target)
    (file, renamed_then), (folder, _) = synced
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/\.out\.bin\.\w+\.tmp", file) and not renamed_then
    assert folder == str(tmp_path)


@contextlib.contextmanager
def file_size_limit(nbytes):
    """Writes past `nbytes` fail with EFBIG, as on a file system at its limit (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_failure_is_one_error_and_keeps_the_old_file(tmp_path, writer):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with file_size_limit(64 * 1024), pytest.raises(
            SoupError, match=f"^cannot write {re.escape(str(target))}: File too large; nothing was changed there$"):
        WRITERS[writer](target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_full_disk_under_torch_save_is_one_error(tmp_path, monkeypatch):
    target = tmp_path / STATE_FILE
    target.write_bytes(b"old")

    class FullDisk(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(soup.train.state, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    with pytest.raises(SoupError, match="cannot write .*state.pt: No space left on device"):
        _state(target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_train_into_an_unwritable_out_is_one_line(small_sketch_root, tmp_path, monkeypatch, err):
    out = tmp_path / "out"
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(err, os.strerror(err), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    path = write_recipe(tmp_path, tiny_recipe(small_sketch_root))
    result = CliRunner().invoke(cli, ["train", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output == f"soup: error: cannot write {out}/tiny/00: {os.strerror(err)}; choose a writable --out\n"


def test_train_with_out_below_a_file_is_one_line(small_sketch_root, tmp_path):
    (tmp_path / "a_file").write_text("")
    path = write_recipe(tmp_path, tiny_recipe(small_sketch_root))
    result = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "a_file" / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output == f"soup: error: cannot write {tmp_path}/a_file/out/tiny/00: Not a directory; choose a " \
                            "writable --out\n"


def test_a_full_disk_while_training_is_one_line(small_sketch_root, tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(small_sketch_root))
    with file_size_limit(256 * 1024):
        result = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "out"), "--no-cache"])
    assert result.exit_code == 2, result.output
    run_dir = tmp_path / "out" / "tiny" / "00"
    assert result.stderr == f"soup: error: cannot write {run_dir}/{STATE_FILE}: File too large; nothing was " \
                            "changed there\n"
    assert run_files(run_dir) == [".lock"]


def test_a_full_disk_while_cooking_is_one_line(trained, tmp_path):
    output = tmp_path / "soup.safetensors"
    with file_size_limit(256 * 1024):
        result = CliRunner().invoke(cli, ["cook", str(trained[1]), "-o", str(output), "--no-eval"])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"soup: error: cannot write {output}: File too large; nothing was changed there\n"
    assert list(tmp_path.iterdir()) == []


# --- recipe values that passed validation and crashed later --------------------------------------------


@pytest.mark.parametrize("setting,key", [
    ("train.seed=-1", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("model.init_seed=-3", "model.init_seed"),
    ("data.holdout_seed=4294967296", "data.holdout_seed"),
    ("train.momentum=-0.5", "train.momentum"),
    ("train.weight_decay=-0.01", "train.weight_decay"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.lr_drop_factor=0", "train.lr_drop_factor"),
    ("train.lr_drop_factor=-0.1", "train.lr_drop_factor"),
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.device=meta", "train.device"),
    ("train.device=mps", "train.device"),
    ("train.device=cuda:x", "train.device"),
    ("data.image_size=7", "data.image_size"),
    ("data.image_size=100000", "data.image_size"),
    ("data.std=[0.2, .inf, 0.2]", "data.std"),
    ("name=..", "name"),
    ("name=../elsewhere", "name"),
    ("name=a/b", "name"),
    ('name="a\\nb"', "name"),
    ("name=.hidden", "name"),
])
def test_values_that_used_to_crash_later_are_one_line(small_sketch_root, tmp_path, setting, key):
    path = write_recipe(tmp_path, tiny_recipe(small_sketch_root))
    result = CliRunner().invoke(cli, ["train", str(path), "--list", "--set", setting])
    assert result.exit_code == 2, result.output
    assert re.fullmatch(rf"soup: error: recipe {re.escape(str(path))}: {re.escape(key)} must [^\n]+\n", result.output)


@pytest.mark.parametrize("setting", ["train.seed=4294967295", "train.momentum=0", "train.device=cuda:1",
                                     "data.image_size=8", "name=my-recipe_2.1"])
def test_values_at_the_edges_are_accepted(small_sketch_root, tmp_path, setting):
    path = write_recipe(tmp_path, tiny_recipe(small_sketch_root))
    result = CliRunner().invoke(cli, ["train", str(path), "--list", "--set", setting])
    assert result.exit_code == 0, result.output


def test_a_swept_value_is_checked_too(small_sketch_root):
    with pytest.raises(SoupError, match=r"sweep.train.seed=-1: train.seed must be in \[0, 2\^32\)"):
        recipe_from_dict(tiny_recipe(small_sketch_root, sweep={"train.seed": [0, -1]}))


def test_duplicate_keys_are_refused_naming_key_and_line(small_sketch_root, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(small_sketch_root), sort_keys=False) + "train:\n  lr: 0.1\n")
    line = path.read_text().splitlines().index("train:", 10) + 1
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert result.exit_code == 2
    assert result.output == f"soup: error: recipe {path} line {line}: duplicate key 'train'; write each key once\n"
    result = CliRunner().invoke(cli, ["train", str(write_recipe(tmp_path, tiny_recipe(small_sketch_root))), "--list",
                                      "--set", "model.kwargs={depth: 1, depth: 2}"])
    assert result.exit_code == 2 and "duplicate key 'depth'" in result.output


def test_yaml_merge_keys_may_be_overridden(small_sketch_root, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: tiny\ndata: {{root: {small_sketch_root}}}\nmodel:\n  backbone: timm:test_resnet\n"
                    "  kwargs:\n    first: &defaults {drop_rate: 0.0, depth: 2}\n"
                    "    second: {<<: *defaults, drop_rate: 0.1}\n")
    assert load_recipe(path).model.kwargs["second"] == {"drop_rate": 0.1, "depth": 2}


def test_a_recipe_that_is_not_utf8_is_one_line(small_sketch_root, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"# caf\xe9 recipe\n" + yaml.safe_dump(tiny_recipe(small_sketch_root)).encode())
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert result.exit_code == 2
    assert result.output == f"soup: error: recipe {path} line 1: not UTF-8 text (byte 0xe9); save it as UTF-8\n"


# --- caps on expansion: fast refusals ---------------------------------------------------------------------

ALIAS_BOMB = "\n".join(["    l0: &l0 [x, x, x, x, x, x, x, x, x]"] +
                       [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)])


def refused_fast(path) -> str:
    """What `soup train PATH --list` says, having checked that it refused within a second."""
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert time.perf_counter() - started < 1
    assert result.exit_code == 2
    return result.output


def test_a_yaml_alias_bomb_is_refused_fast(small_sketch_root, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: tiny\ndata: {{root: {small_sketch_root}}}\n"
                    f"model:\n  backbone: timm:test_resnet\n  kwargs:\n{ALIAS_BOMB}\n")
    assert refused_fast(path) == (f"soup: error: recipe {path}: more than 100,000 values once YAML aliases are expanded "
                             "(the cap of a recipe); write the values out or use fewer aliases\n")


def test_a_recursive_alias_is_refused(small_sketch_root, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: tiny\ndata: {{root: {small_sketch_root}}}\n"
                    "model: {backbone: 'timm:test_resnet', kwargs: {loop: &loop [1, *loop]}}\n")
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert result.exit_code == 2 and "a YAML alias refers to a value that contains it" in result.output


def test_a_few_aliases_are_fine(small_sketch_root, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: tiny\ndata: {{root: {small_sketch_root}, mean: &m [0.5, 0.5, 0.5], std: *m}}\n"
                    "model: {backbone: 'timm:test_resnet'}\n")
    result = CliRunner().invoke(cli, ["train", str(path), "--list"])
    assert result.exit_code == 0, result.output


def test_a_huge_sweep_is_refused_fast(small_sketch_root, tmp_path):
    sweep = {"train.seed": list(range(100)), "train.lr": [1e-3] * 10, "train.epochs": list(range(1, 101))}
    path = write_recipe(tmp_path, tiny_recipe(small_sketch_root, sweep=sweep))
    assert refused_fast(path) == (f"soup: error: recipe {path}: sweep: 100 x 10 x 100 = 100,000 ingredients, more than "
                             "the cap of 1,000; split it into several recipes\n")
    recipe_from_dict(tiny_recipe(small_sketch_root, sweep={"train.seed": list(range(100)), "train.lr": [1e-3] * 10}))


# --- interrupts before the training loop --------------------------------------------------------------

SIGNAL_AT_TORCH_IMPORT = """
import os, runpy, signal, sys

class SignalAtTorchImport:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(SignalAtTorchImport)
            os.kill(os.getpid(), signal.{sig})

sys.meta_path.insert(0, SignalAtTorchImport)
sys.argv[0] = "soup"
runpy.run_module("soup", run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_soup_starts_is_one_line(tmp_path, sig):
    # While the CLI loads torch: the first seconds of every command.
    result = subprocess.run([sys.executable, "-c", SIGNAL_AT_TORCH_IMPORT.format(sig=sig), "train", "r.yaml"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, cwd=tmp_path,
                            timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "soup: interrupted\n")


@pytest.mark.parametrize("phase", ["class_list", "build_model", "build_pipeline"])  # data scan, model, cache
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_before_the_training_loop_is_one_line(small_sketch_root, tmp_path, monkeypatch, phase, sig):
    real = getattr(soup.train.loop, phase)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    class Terminated(Exception):
        pass

    def terminated(signum, frame):  # what SIGTERM did before soup handled it (exit), without ending pytest
        raise Terminated

    monkeypatch.setattr(soup.train.loop, phase, interrupted)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        path = write_recipe(tmp_path, tiny_recipe(small_sketch_root))
        result = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "out")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 130, result.output
    assert result.stderr == "soup: interrupted\n"
