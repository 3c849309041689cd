"""Issue 10, data and cache findings: CPU autocast by capability, patch dropout and model configuration
in the prefix cache, 16-bit PNGs, symlink loops, stale temporaries, same-size replaced images and an
unwritable SOUP_CACHE_DIR."""

import errno
import fcntl
import os
import shutil
import signal
import tempfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from torchvision.datasets import ImageFolder

from soup.cli import cli
from soup.data.folders import class_list, load_rgb, load_split
from soup.fast import decoded as fast_decoded, prefix as fast_prefix, store as fast_store
from soup.fast.build import build_pipeline
from soup.models import precision
from soup.models.backbones import fingerprint

from conftest import tiny_recipe, vit_setup

CPU = torch.device("cpu")


@pytest.fixture
def data_copy(small_sketch_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small_sketch_root, root, ignore=shutil.ignore_patterns(".soup_cache"))
    return root


# ------------------------------------------------------------------------------------ CPU autocast

@pytest.fixture
def cpu_is(monkeypatch):
    """Pretend this CPU has (or lacks) native bf16; the choice is made afresh."""
    def pretend(bf16: bool, machine: str = "x86_64", speedup: float | None = None):
        flags = {"avx2": True, "avx512f": bf16, "avx512_bf16": bf16, "amx_tile": False}
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)
        if speedup is not None:
            monkeypatch.setattr(precision, "probe_bf16_speedup", lambda: speedup)
        precision.cpu_bf16.cache_clear()
    yield pretend
    precision.cpu_bf16.cache_clear()


def test_cpu_autocast_follows_native_bf16(cpu_is):
    cpu_is(bf16=False)
    dtype, why = precision.choose_autocast("fp16", CPU)
    assert dtype is None and "no native bf16" in why and why.startswith("train.amp: fp16")
    cpu_is(bf16=True)
    dtype, why = precision.choose_autocast("bf16", CPU)
    assert dtype is torch.bfloat16 and "natively (avx512_bf16)" in why
    assert precision.choose_autocast("off", CPU) == (None, "train.amp: off")


def test_cpu_autocast_without_flags_is_probed_once(cpu_is, monkeypatch):
    cpu_is(bf16=False, machine="aarch64", speedup=2.0)
    assert precision.choose_autocast("fp16", CPU)[0] is torch.bfloat16
    monkeypatch.setattr(precision, "probe_bf16_speedup", lambda: pytest.fail("probed twice"))
    assert "faster in bf16" in precision.choose_autocast("fp16", CPU)[1]  # cached per process
    cpu_is(bf16=False, machine="aarch64", speedup=0.1)
    dtype, why = precision.choose_autocast("fp16", CPU)
    assert dtype is None and "fp32 is faster" in why


def test_train_prints_the_precision_and_its_reason(small_sketch_root, tmp_path, monkeypatch, cpu_is):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(small_sketch_root, train={"amp": "fp16"})))
    cpu_is(bf16=False)
    slow = CliRunner().invoke(cli, ["train", "r.yaml", "--out", "a"])
    cpu_is(bf16=True)
    fast = CliRunner().invoke(cli, ["train", "r.yaml", "--out", "b"])
    assert slow.exit_code == 0 and fast.exit_code == 0, slow.output + fast.output
    slow_line = " ".join(slow.output.split())
    assert "precision: fp32 (train.amp: fp16; this CPU has no native bf16 (no avx512_bf16 or AMX)" in slow_line
    assert "precision: bfloat16 autocast (train.amp: fp16; this CPU computes bf16 natively" in " ".join(fast.output.split())


def test_cpu_flags_are_reported_for_benchmarks():
    line = precision.cpu_flags_line()
    assert all(f"{flag} " in line for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile"))


# ------------------------------------------------------------------------------ prefix: behaviour

@pytest.mark.parametrize("kwargs, cached", [({"patch_drop_rate": 0.5}, False), ({"drop_path_rate": 0.05}, False),
                                            ({}, True)])
def test_prefix_cache_only_where_train_mode_computes_the_same(small_sketch_root, kwargs, cached, fresh_caches):
    recipe, model, train_set, val_set = vit_setup(small_sketch_root, **kwargs)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    description = build_pipeline(recipe, model, train_set, val_set, CPU).description
    # Neither the probe nor building the stores moves training's random stream.
    assert torch.equal(torch.get_rng_state(), rng)
    if cached:
        assert description.startswith("prefix cache: 2 blocks"), description
    else:
        assert description.startswith("decoded-image cache") and "no prefix cache for training: the frozen prefix" in description
        assert "train mode" in description


def test_probe_leaves_batch_norm_statistics_alone():
    from soup.fast.determinism import train_mode_difference

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    why = train_mode_difference(net, [net], torch.randn(2, 3, 8, 8))
    assert "differently in train mode" in why and net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------- prefix: configuration

def test_models_that_compute_differently_never_share_features(data_copy, monkeypatch, fresh_caches):
    gelu = vit_setup(data_copy)
    relu = vit_setup(data_copy, act_layer="relu")
    assert fingerprint(gelu[1]) == fingerprint(relu[1])  # same weights: only the forward differs

    def tokens(setup):
        pipeline = build_pipeline(*setup, CPU)
        assert pipeline.description.startswith("prefix cache"), pipeline.description
        return pipeline, next(iter(pipeline.train_batches(0)))[0]

    (_, a), (second, b) = tokens(gelu), tokens(relu)
    assert "(computed now)" in second.description and not torch.equal(a, b)

    monkeypatch.setenv(fast_prefix.FEATURE_STORE_ENV, "disk")
    stores = []
    for setup, expected in ((gelu, a), (relu, b)):
        fast_prefix._FEATURES.clear()  # as a new process would start: only the disk store is left
        pipeline, x = tokens(setup)
        assert "memory map (computed now)" in pipeline.description and torch.equal(x, expected)
        stores.append(sorted((data_copy / ".soup_cache").glob("prefix-train_images-*.bin")))
    assert stores[0] != stores[1]
    fast_prefix._FEATURES.clear()
    again, c = tokens(relu)
    assert "shared with an earlier run" in again.description and torch.equal(b, c)


# --------------------------------------------------------------------------------- data: images

def test_16_bit_png_keeps_its_top_8_bits(tmp_path):
    values = np.linspace(0, 65535, 40 * 30).round().astype(np.uint16).reshape(30, 40)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    rgb = np.asarray(load_rgb(str(tmp_path / "g.png")))
    assert rgb.shape == (30, 40, 3) and rgb[..., 0].max() == 255 and rgb[..., 0].min() == 0
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], (values >> 8).astype(np.uint8))


def counts(root):
    data = {"root": str(root), "image_size": 32}
    from soup.recipe.spec import recipe_from_dict

    folder = load_split(recipe_from_dict(tiny_recipe(root, data=data)).data, "val")
    return Counter(folder.classes[t] for t in folder.targets), folder


def test_symlink_loops_are_not_followed(data_copy):
    val = data_copy / "val_images"
    expected, folder = counts(data_copy)
    plain = ImageFolder(str(val))  # torchvision's own order, before any link exists
    assert folder.samples == plain.samples
    outside = data_copy / "extra"
    shutil.copytree(val / "circle", outside)
    (val / "circle" / "more").symlink_to(outside, target_is_directory=True)  # a real folder: read once
    (val / "cross" / "more").symlink_to(outside, target_is_directory=True)  # the same folder again: skipped
    (val / "circle" / "loop").symlink_to(val, target_is_directory=True)  # one loop (41x before)
    (val / "square" / "a").symlink_to(val / "square", target_is_directory=True)  # two loops (hung before)
    (val / "square" / "b").symlink_to("..", target_is_directory=True)

    class TooSlow(Exception):  # not an OSError: os.walk swallows those
        pass

    def too_slow(*_):
        raise TooSlow("listing the data folder took over 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        started = time.perf_counter()
        found, folder = counts(data_copy)
        assert time.perf_counter() - started < 5
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert found == expected + Counter({"circle": expected["circle"]})
    read = {os.path.relpath(os.path.dirname(path), val) for path, _ in folder.samples}
    assert read == {"circle", "circle/more", "cross", "square", "triangle"}


# ---------------------------------------------------------------------------- cache: files on disk

def train_folder(root):
    from soup.recipe.spec import recipe_from_dict

    recipe = recipe_from_dict(tiny_recipe(root))
    return fast_decoded.unwrap(load_split(recipe.data, "train", classes=class_list(root)))[0]


def test_stale_temporaries_of_a_killed_run_are_removed(data_copy, fresh_caches):
    store = data_copy / ".soup_cache"
    store.mkdir()
    old = time.time() - 3600
    killed = store / ".decoded-train_images-32-0123456789abcdef.bin.k1ll3d.tmp"
    killed.write_bytes(b"\0" * 4096)
    os.utime(killed, (old, old))
    live = store / ".prefix-train_images-0123456789abcdef.bin.l1v3.tmp"
    live.write_bytes(b"\0" * 4096)
    os.utime(live, (old, old))
    young = store / ".decoded-val_images-32-0123456789abcdef.bin.y0ung.tmp"
    young.write_bytes(b"\0" * 4096)
    foreign = store / ".notes.txt.tmp"  # not one of the cache's stores
    foreign.write_bytes(b"")
    os.utime(foreign, (old, old))
    with open(live, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # as a live process writing it holds it
        built = fast_decoded.decoded_images(train_folder(data_copy), 32)
    assert built.built and not killed.exists()
    assert live.exists() and young.exists() and foreign.exists()
    assert not [p for p in store.glob(".decoded-*.tmp") if p != young]  # the build left none of its own


def test_a_replaced_image_of_the_same_size_and_mtime_is_seen(data_copy, fresh_caches):
    path = train_folder(data_copy).samples[0][0]
    # Uncompressed PNGs of one size have one file size whatever the pixels.
    Image.new("RGB", (40, 40), "black").save(path, format="PNG", compress_level=0)
    first = fast_decoded.decoded_images(train_folder(data_copy), 32)
    stat = os.stat(path)
    Image.new("RGB", (40, 40), "white").save(path, format="PNG", compress_level=0)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    fast_decoded._DECODED.clear()
    second = fast_decoded.decoded_images(train_folder(data_copy), 32)
    assert first.images[0].max() == 0 and second.built and second.images[0].min() == 255


def test_unwritable_cache_dir_warns_and_caches_elsewhere(small_sketch_root, tmp_path, monkeypatch, fresh_caches):
    blocked = tmp_path / "blocked"
    real = tempfile.mkstemp

    def refuse_blocked(*args, **kwargs):
        if str(kwargs.get("dir", "")).startswith(str(blocked)):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_store.tempfile, "mkstemp", refuse_blocked)
    monkeypatch.setenv(fast_store.CACHE_DIR_ENV, str(blocked))
    monkeypatch.setattr(fast_store, "_WARNED", set())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(small_sketch_root, data, ignore=shutil.ignore_patterns(".soup_cache"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(data)))
    result = CliRunner().invoke(cli, ["train", "r.yaml", "--out", "out"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "not writable" in line]
    assert warnings == [f"warning: SOUP_CACHE_DIR={blocked} is not writable (Permission denied); caching in "
                        f"{data / '.soup_cache'} instead"]
    assert "data path: decoded-image cache" in result.output and list((data / ".soup_cache").glob("*.bin"))

    # Nothing writable at all: the plain path, still no failure.
    def refuse_all(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fast_store.tempfile, "mkstemp", refuse_all)
    fast_decoded._DECODED.clear()
    shutil.rmtree(data / ".soup_cache")
    recipe, model, train_set, val_set = vit_setup(data)
    with pytest.raises(fast_store.CacheUnavailable):
        fast_store.cache_dir(data)
    description = build_pipeline(recipe, model, train_set, val_set, CPU).description
    assert description.startswith("plain")
