"""Faults injected for real: killed and interrupted runs, full disks, corrupt images and files, NaNs."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import soup.models.checkpoint
import soup.models.files
from soup.cli import cli
from soup.cook.cooking import cook
from soup.data.folders import load_rgb
from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint, save_checkpoint
from soup.models.files import write_text_atomic
from soup.models.runs import STATE_FILE
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient
from soup.train.sweep import train_recipe
from soup.train.state import ingredient_lock

from conftest import state_close, tiny_recipe, tiny_vit_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vit_recipe(root, epochs=6, **train):
    return tiny_recipe(root, model=tiny_vit_model(freeze=0.5), data={"image_size": 28},
                       train={"epochs": epochs, "batch_size": 8, "lr_drop_epoch": 3, **train})


def start_training(recipe_path, out, *extra):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-m", "soup", "train", str(recipe_path), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "the run never saved a state"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_to_the_same_weights(sketch_root, tmp_path, sig):
    # The lr schedule steps per optimizer step and the EMA's weights travel with the state.
    recipe = vit_recipe(sketch_root, schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1, ema=0.9)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "out" / "tiny" / "00"
    process = start_training(path, tmp_path / "out")
    wait_for(run_dir / STATE_FILE, process)
    time.sleep(0.3)  # into the next epoch
    process.send_signal(sig)
    output = process.communicate(timeout=60)[0]
    assert not (run_dir / "model.safetensors").exists(), "the run finished before it was killed"
    assert (run_dir / STATE_FILE).exists()
    if sig == signal.SIGINT:  # Ctrl-C: one clean line, exit 130, state kept
        assert process.returncode == 130, output
        assert "interrupted" in output and "--resume" in output and "Traceback" not in output
        assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    # A kill -9 that lands while state.pt is being written leaves its temporary file: the resume removes it.

    refused = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "out")])
    assert refused.exit_code == 2 and "add --resume" in refused.output
    resumed = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "out"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed after epoch" in resumed.output
    assert not (run_dir / STATE_FILE).exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    [(_, reference)] = train_recipe(recipe_from_dict(recipe), tmp_path / "reference")
    a, b = read_checkpoint(run_dir / "model.safetensors"), read_checkpoint(reference)
    assert state_close(a.state_dict(), b.state_dict(), atol=1e-6)
    strip = lambda history: [{k: v for k, v in h.items() if k not in ("images_per_s", "seconds")} for h in history]
    assert strip(a.meta["val_history"]) == strip(b.meta["val_history"])

    again = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "out"), "--resume"])
    assert again.exit_code == 0 and "finished already, skipped" in again.output


def test_second_process_on_the_same_ingredient_is_refused(small_sketch_root, tmp_path):
    [ingredient] = expand_sweep(recipe_from_dict(tiny_recipe(small_sketch_root)))
    with ingredient_lock(tmp_path / "tiny" / "00"):
        with pytest.raises(SoupError, match="another process is training this ingredient"):
            train_ingredient(ingredient, tmp_path)


def test_full_disk_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    meta = {"kind": "ingredient", "recipe": {}, "backbone": "b", "classes": ["a"], "start_fingerprint": "f"}
    save_checkpoint(target, {"w": torch.ones(3)}, meta)
    before = target.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(soup.models.checkpoint, "save_file", full_disk)
    with pytest.raises(SoupError, match="cannot write .*model.safetensors: No space left on device"):
        save_checkpoint(target, {"w": torch.zeros(3)}, meta)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_read_only_folder_is_one_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "submission.csv").write_text("old\n")
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permission bits: make the kernel's answer explicit
        def read_only(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(soup.models.files.tempfile, "mkstemp", read_only)
    try:
        with pytest.raises(SoupError, match="cannot write .*submission.csv: Permission denied"):
            write_text_atomic(folder / "submission.csv", "new\n")
        assert (folder / "submission.csv").read_text() == "old\n"
    finally:
        folder.chmod(0o755)


@pytest.fixture
def bad_image_root(tmp_path, small_sketch_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(small_sketch_root, root)
    good = next((root / "train_images" / "circle").iterdir())
    (root / "train_images" / "circle" / "truncated.jpeg").write_bytes(good.read_bytes()[:200])
    (root / "train_images" / "cross" / "notes.jpg").write_text("this is not an image")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_is_an_error_naming_the_file(bad_image_root, tmp_path, workers):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(bad_image_root, train={"num_workers": workers})))
    result = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert ("truncated.jpeg" in line or "notes.jpg" in line) and "data.skip_bad_images: true" in line


def test_bad_images_skipped_and_counted(bad_image_root, tmp_path):
    recipe = recipe_from_dict(tiny_recipe(bad_image_root, data={"skip_bad_images": True}))
    [(_, path)] = train_recipe(recipe, tmp_path)
    import json

    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert sorted(os.path.basename(p) for p in metrics["skipped_images"]) == ["notes.jpg", "truncated.jpeg"]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16"])
def test_odd_image_modes_become_rgb(tmp_path, mode):
    image = Image.new("RGB", (20, 10), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 10, 10))
    if mode in ("RGBA", "LA"):
        image = image.convert(mode)
        image.putalpha(Image.new("L", (20, 10), 0))  # fully transparent: must read as white paper
    else:
        image = image.convert(mode)
    suffix = ".jpg" if mode in ("L", "CMYK") else ".png"
    path = tmp_path / f"x{suffix}"
    image.save(path)
    rgb = load_rgb(str(path))
    assert rgb.mode == "RGB" and rgb.size == (20, 10)
    if mode in ("RGBA", "LA"):
        assert rgb.getpixel((2, 2)) == (255, 255, 255)


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] + [255, 255, 255] * 255)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    assert load_rgb(str(tmp_path / "p.png")).getpixel((1, 1)) == (255, 255, 255)


def test_decompression_bomb_is_an_error(tmp_path, monkeypatch):
    Image.new("L", (300, 300), 255).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 90,000 px: between the warning and error limits
    with pytest.raises(SoupError, match="big.png: image too large to decode safely"):
        load_rgb(str(tmp_path / "big.png"))


def test_cook_refuses_nan_weights(tmp_path):
    meta = {"kind": "ingredient", "name": "p", "recipe": {}, "backbone": "b", "classes": ["a"],
            "start_fingerprint": "f"}
    good = save_checkpoint(tmp_path / "a" / "model.safetensors", {"w": torch.ones(3)}, {**meta, "id": "a"})
    bad = save_checkpoint(tmp_path / "b" / "model.safetensors", {"w": torch.tensor([1.0, float("nan"), 0.0])},
                          {**meta, "id": "b"})
    with pytest.raises(SoupError, match=r"b/model.safetensors: tensor w holds NaN or infinite values"):
        cook("uniform", [read_checkpoint(good), read_checkpoint(bad)], tmp_path / "s.safetensors", None)
    assert not (tmp_path / "s.safetensors").exists()


def test_nan_loss_keeps_the_last_good_state(small_sketch_root, tmp_path):
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, train={"epochs": 2, "lr": 1e-3}))
    [ingredient] = expand_sweep(recipe)
    train_ingredient(ingredient, tmp_path / "first")
    # Same run, but the second epoch explodes: epoch 1's state must survive for a resume.
    exploding = recipe_from_dict(tiny_recipe(small_sketch_root, train={"epochs": 2, "lr": 1e-3}))
    [ingredient] = expand_sweep(exploding)

    calls = {"n": 0}
    original = torch.nn.functional.cross_entropy

    def explode_later(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 4 else loss

    import soup.data.augment

    try:
        soup.data.augment.F.cross_entropy = explode_later
        with pytest.raises(SoupError, match=r"loss became nan at epoch 2, step \d+ .*last good state \(after epoch 1\)"):
            train_ingredient(ingredient, tmp_path / "second")
    finally:
        soup.data.augment.F.cross_entropy = original
    assert (tmp_path / "second" / "tiny" / "00" / STATE_FILE).exists()
    assert not (tmp_path / "second" / "tiny" / "00" / "model.safetensors").exists()


@pytest.mark.parametrize("content,message", [
    ("truncate", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("foreign", "without soup metadata"),
])
def test_bad_checkpoint_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    if content == "foreign":
        save_file({"w": torch.ones(2)}, path)
    elif content == "garbage":
        path.write_bytes(b"\x00\x01 not safetensors at all")
    else:
        meta = {"kind": "ingredient", "recipe": {}, "backbone": "b", "classes": ["a"], "start_fingerprint": "f"}
        save_checkpoint(path, {"w": torch.ones(1000)}, meta)
        path.write_bytes(path.read_bytes()[:-100])
    result = CliRunner().invoke(cli, ["eval", str(path)])
    assert result.exit_code == 2
    assert message in result.output and str(path) in result.output
    assert len(result.output.strip().splitlines()) == 1
