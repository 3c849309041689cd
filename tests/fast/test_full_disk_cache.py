"""A cache store that finds no room on the disk: the run goes on without it, on the plain path, with one
warning; nothing half-written is left, and no memory map is filled over missing disk blocks (SIGBUS)."""

import errno
import json
import os
import shutil

import pytest
import yaml
from click.testing import CliRunner

from soup.cli import cli
from soup.fast import store as fast_store

from conftest import tiny_recipe, tiny_vit_model


@pytest.fixture
def full_disk(small_sketch_root, tmp_path, monkeypatch, fresh_caches):
    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(small_sketch_root, data, ignore=shutil.ignore_patterns(".soup_cache"))
    monkeypatch.setenv(fast_store.CACHE_DIR_ENV, str(cache))
    reserved = []

    def no_space(fd, offset, length):
        reserved.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    return data, cache, reserved


def test_train_and_eval_go_on_without_the_cache(full_disk, tmp_path):
    data, cache, reserved = full_disk
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(data, model=tiny_vit_model(freeze=0.5), data={"image_size": 28})))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["train", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert reserved and "data path: plain: decode and resize every image every epoch (cannot make the" in said
    assert "No space left on device; going on without it (slower): free space there or set SOUP_CACHE_DIR" in said
    assert said.count("warning: cannot make the") == 1  # the warning, then the data path line says why
    assert [p.name for p in cache.iterdir()] == []  # no temporary, no half store
    [checkpoint] = list(out.rglob("model.safetensors"))

    evaluated = CliRunner().invoke(cli, ["eval", str(checkpoint), "--json", "--bootstrap", "0"])
    assert evaluated.exit_code == 0, evaluated.output
    rows = json.loads(evaluated.output[evaluated.output.index("["):])
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    assert rows[0]["top1"] == pytest.approx(metrics["val_acc"])
    assert [p.name for p in cache.iterdir()] == []


def test_a_file_system_without_fallocate_gets_a_sparse_store(small_sketch_root, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(
        OSError(errno.EOPNOTSUPP, "Operation not supported")), raising=False)
    path = tmp_path / "store.bin"
    array = fast_store.create_store(path, "k", (4, 3), "uint8", lambda out: out.__setitem__(slice(None), 7))
    assert array.shape == (4, 3) and (array == 7).all()
    assert fast_store.open_store(path, "k") is not None
