"""soup import against hostile and broken sources (issue 31): a source never chooses code (a recorded hub:
architecture), a file (model kwargs naming one) or a loading choice; bad tensors (NaN, negative BatchNorm
variances, integers where the model has floats, the meta device, a damaged zip) are one line naming the
source and the tensor; nothing is half-written; the start file is reused or refused, never written through a
link. Each format soup import reads is covered: timm train.py folder, Hub folder, Lightning .ckpt, plain
state dict, safetensors file."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import soup.models.checkpoint
from soup.cli import cli
from soup.models.checkpoint import read_checkpoint

from conftest import CLASSES, one_error_line, tiny_recipe

ARCH = "test_resnet"
FORMATS = ["timm folder", "Hub folder", "Lightning ckpt", "state dict", "safetensors"]
RECORDING = FORMATS[:3]  # the formats that record an architecture and model kwargs


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES)).state_dict()


def _write(work: Path, fmt: str, state: dict, arch: str = ARCH, kwargs: dict | None = None, name: str = "",
           **records) -> list[str]:
    """`state` saved in `fmt` under `work` as that format's own tool lays it out, recording `arch`, model
    `kwargs` and `records` (timm's args, Lightning's hyper_parameters) where the format records them; the
    import arguments naming it (with --model where the format records no architecture)."""
    kwargs = kwargs or {}
    if fmt == "timm folder":
        folder = work / (name or "run")
        folder.mkdir()
        args = {"model": arch, "num_classes": len(CLASSES), "model_kwargs": kwargs, **records}
        torch.save({"epoch": 1, "arch": arch, "state_dict": state, "args": argparse.Namespace(**args)},
                   folder / "model_best.pth.tar")
        (folder / "args.yaml").write_text(yaml.safe_dump(args))
        return [str(folder)]
    if fmt == "Hub folder":
        folder = work / (name or "hf")
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        config = {"architecture": arch, "num_classes": len(CLASSES), "model_args": kwargs,
                  "pretrained_cfg": records}
        (folder / "config.json").write_text(json.dumps(config))
        return [str(folder)]
    if fmt == "Lightning ckpt":
        path = work / f"{name or 'run'}.ckpt"
        torch.save({"epoch": 1, "pytorch-lightning_version": "2.6.6", "state_dict": {f"model.{k}": v for k, v in
                    state.items()}, "hyper_parameters": {"arch": arch, "model_kwargs": kwargs, **records}}, path)
        return [str(path)]
    if fmt == "state dict":
        path = work / f"{name or 'weights'}.pth"
        torch.save(state, path)
        return [str(path), "--model", arch]
    path = work / f"{name or 'weights'}.safetensors"
    save_file(state, str(path))
    return [str(path), "--model", arch]


def _import(work: Path, *args):
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return CliRunner().invoke(cli, ["import", *[str(a) for a in args]])
    finally:
        os.chdir(cwd)


def _nothing_written(work: Path) -> None:
    assert not (work / "checkpoints").exists(), sorted((work / "checkpoints").rglob("*"))


class OpenWatch:
    """The kernel's word (inotify) on whether anyone opened or read a file since the watch began: no
    monkeypatch of a library's reader can miss a path through another reader (timm's, safetensors' Rust)."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, path: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0 and self.libc.inotify_add_watch(self.fd, os.fsencode(path),
                                                            self.IN_ACCESS | self.IN_OPEN) >= 0

    def opened(self) -> bool:
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False


needs_inotify = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


# --- A: a recorded hub: architecture runs no code -------------------------------------------------------------

def _marking_hub(tmp_path: Path) -> tuple[Path, Path]:
    """A torch.hub folder whose hubconf.py, when imported, writes a marker file: proof that code ran."""
    marker = tmp_path / "marker"
    hub = tmp_path / "evil_hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(textwrap.dedent(f'''
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        dependencies = ["torch"]

        def entry(pretrained=False, **kwargs):
            import torch
            return torch.nn.Identity()
    '''))
    return hub, marker


@pytest.mark.parametrize("fmt", RECORDING)
def test_a_recorded_hub_architecture_runs_no_code(small_sketch_root, tmp_path, fmt):
    hub, marker = _marking_hub(tmp_path)
    source = _write(tmp_path, fmt, _state(), arch=f"hub:{hub}:entry")
    for start in ([], ["--start", "pretrained"]):
        one_error_line(_import(tmp_path, *source, "--data", small_sketch_root, *start), "--trust-hub", str(hub))
    assert not marker.exists()
    _nothing_written(tmp_path)
    # The marker does tell: trusted, the same import runs that code (and then fails on its tensors).
    _import(tmp_path, *source, "--data", small_sketch_root, "--trust-hub", str(hub))
    assert marker.exists()


@pytest.mark.parametrize("fmt", RECORDING)
def test_a_recorded_github_hub_is_never_fetched(small_sketch_root, tmp_path, fmt):
    """A GitHub repo a source names is refused before any download (the no_network fixture would fail it)."""
    source = _write(tmp_path, fmt, _state(), arch="hub:someone/evil_repo:entry")
    one_error_line(_import(tmp_path, *source, "--data", small_sketch_root), "--trust-hub someone/evil_repo")
    _nothing_written(tmp_path)


# --- B: recorded kwargs never name a file or choose loading -------------------------------------------------

FILE_KWARGS = {
    "pretrained_cfg_overlay.file": lambda f: {"pretrained_cfg_overlay": {"file": f}},
    "pretrained_cfg": lambda f: {"pretrained_cfg": {"file": f, "num_classes": 0}},
    "checkpoint_path": lambda f: {"checkpoint_path": f},
    "cache_dir": lambda f: {"cache_dir": str(Path(f).parent)},
    "a path under a plain name": lambda f: {"act_layer": f},
}


@needs_inotify
@pytest.mark.parametrize("fmt", RECORDING)
@pytest.mark.parametrize("kwarg", FILE_KWARGS)
def test_a_file_a_source_names_is_never_opened(small_sketch_root, tmp_path, fmt, kwarg):
    watched = tmp_path / "elsewhere" / "weights.safetensors"  # a real, readable start timm would take
    watched.parent.mkdir()
    save_file({k: v for k, v in _state(1).items() if not k.startswith("fc.")}, str(watched))
    source = _write(tmp_path, fmt, _state(), kwargs=FILE_KWARGS[kwarg](str(watched)))
    key = kwarg.split(".")[0] if kwarg != "a path under a plain name" else "act_layer"
    watch = OpenWatch(watched)
    for start in ([], ["--start", "pretrained"]):
        result = _import(tmp_path, *source, "--data", small_sketch_root, *start)
        one_error_line(result, Path(source[0]).name, f"model kwarg {key}", "refused")
    assert not watch.opened()
    _nothing_written(tmp_path)
    watched.read_bytes()
    assert watch.opened()  # the watch does see a read


def test_plain_architecture_kwargs_are_taken(small_sketch_root, tmp_path):
    """The allow-list is no wall: a drop-path rate, a pooling type and an image size pass as they are."""
    kwargs = {"drop_path_rate": 0.1, "global_pool": "avg", "drop_rate": 0.0}
    source = _write(tmp_path, "Hub folder", _state(), kwargs=kwargs)
    result = _import(tmp_path, *source, "--data", small_sketch_root)
    assert result.exit_code == 0, result.output
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-hf" / "model.safetensors")
    assert checkpoint.recipe["model"]["kwargs"] == kwargs


# --- C: one line, not a traceback -------------------------------------------------------------------------

def test_text_in_a_saved_mean_is_one_line(small_sketch_root, tmp_path):
    source = _write(tmp_path, "timm folder", _state(), mean=["red", "green", "blue"])
    one_error_line(_import(tmp_path, *source, "--data", small_sketch_root), "args", "mean", "not three numbers")


def test_an_invalid_global_pool_is_one_line(small_sketch_root, tmp_path):
    source = _write(tmp_path, "timm folder", _state(), gp="evil")
    one_error_line(_import(tmp_path, *source, "--data", small_sketch_root), "global_pool", "evil")
    _nothing_written(tmp_path)


@pytest.mark.parametrize("fmt", ["timm folder", "Lightning ckpt", "state dict"])
def test_tensors_sharing_storage_are_imported_whole(small_sketch_root, tmp_path, fmt):
    """torch.save keeps tied tensors and views of one storage as such, and safetensors refuses to write
    tensors sharing memory: each is written as a copy of its own."""
    state = _state()
    shape = state["bn1.running_mean"].shape
    names = [k for k, v in state.items() if k.endswith("running_mean") and v.shape == shape][:3]
    state[names[1]] = state[names[0]]  # tied
    flat = torch.cat([state[names[2]], state[names[2]][:1]])  # overlapping views of one storage
    state[names[0]], state[names[2]] = flat[:shape[0]], flat[1:]
    state[names[1]] = state[names[0]]
    source = _write(tmp_path, fmt, state)
    result = _import(tmp_path, *source, "--data", small_sketch_root)
    assert result.exit_code == 0, result.output
    [written] = (tmp_path / "checkpoints" / "imported").glob("*/model.safetensors")
    saved = read_checkpoint(written).state_dict()
    assert all(torch.equal(saved[f"backbone.{k}"], state[k]) for k in names)


@pytest.mark.parametrize("fmt", ["timm folder", "Lightning ckpt", "state dict"])
def test_a_meta_device_tensor_is_one_line(small_sketch_root, tmp_path, fmt):
    state = _state()
    state["conv1.0.weight"] = torch.empty(state["conv1.0.weight"].shape, device="meta")
    source = _write(tmp_path, fmt, state)
    one_error_line(_import(tmp_path, *source, "--data", small_sketch_root), "conv1.0.weight", "meta device")
    _nothing_written(tmp_path)


class _Marker:
    """Unpickling this would write a file: the proof that a file ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_a_recipes_own_checkpoint_path_naming_a_pickle_is_one_line(small_sketch_root, tmp_path):
    """The user named the file, so timm may read it (tensors only); what it cannot read is one line."""
    marker = tmp_path / "marker"
    torch.save({"state_dict": _state(), "hook": _Marker(marker)}, tmp_path / "evil.pth")
    recipe = tiny_recipe(small_sketch_root, model={"kwargs": {"checkpoint_path": str(tmp_path / "evil.pth")}})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(cli, ["train", "r.yaml"])
    finally:
        os.chdir(cwd)
    one_error_line(result, "model.kwargs", "checkpoint_path", "nothing in it was run")
    assert not marker.exists()


# --- D: all or nothing ------------------------------------------------------------------------------------

def test_a_bad_second_source_writes_nothing_and_a_rerun_works(small_sketch_root, tmp_path):
    good = _write(tmp_path, "state dict", _state(0), name="a")[0]
    bad_state = _state(1)
    bad_state["fc.weight"][0, 0] = float("nan")
    bad = _write(tmp_path, "state dict", bad_state, name="b")[0]
    start = _write(tmp_path, "state dict", _state(2), name="start")[0]
    args = [good, bad, "--model", ARCH, "--data", small_sketch_root, "--start", start]
    one_error_line(_import(tmp_path, *args), "b.pth", "fc.weight", "NaN")
    _nothing_written(tmp_path)
    torch.save(_state(1), bad)
    result = _import(tmp_path, *args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "checkpoints" / "imported").glob("*/model.safetensors"))) == 2


def test_a_write_failing_midway_leaves_nothing(small_sketch_root, tmp_path, monkeypatch):
    """A full disk at the second file: the first, written already, is not left behind as half an import."""
    sources = [_write(tmp_path, "state dict", _state(i), name=f"s{i}")[0] for i in range(2)]
    real, calls = soup.models.checkpoint.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, os.strerror(28), path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(soup.models.checkpoint, "save_file", full_disk)
    one_error_line(_import(tmp_path, *sources, "--model", ARCH, "--data", small_sketch_root),
                   "No space left on device")
    _nothing_written(tmp_path)
    monkeypatch.setattr(soup.models.checkpoint, "save_file", real)
    result = _import(tmp_path, *sources, "--model", ARCH, "--data", small_sketch_root)
    assert result.exit_code == 0, result.output


# --- E, H: values that are no weights, in every format ------------------------------------------------------

def _nan(state):
    state["fc.weight"][1, 2] = float("nan")


def _inf(state):
    state["conv1.0.weight"].view(-1)[5] = float("-inf")


def _negative_var(state):
    key = next(k for k in state if k.endswith("running_var"))
    state[key][0] = -1.0


BAD_VALUES = {
    "NaN": (_nan, ["fc.weight", "NaN"]),
    "infinity": (_inf, ["conv1.0.weight", "infinite"]),
    "negative running_var": (_negative_var, ["running_var", "negative BatchNorm variances"]),
    "integers": (lambda s: s.update({"fc.weight": s["fc.weight"].round().to(torch.int64)}),
                 ["fc.weight", "int64", "float32"]),
    "booleans": (lambda s: s.update({"fc.bias": s["fc.bias"] > 0}), ["fc.bias", "bool"]),
    "complex": (lambda s: s.update({"fc.weight": s["fc.weight"].to(torch.complex64)}), ["fc.weight", "complex64"]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_values_that_are_no_weights_are_refused(small_sketch_root, tmp_path, fmt, bad):
    spoil, fragments = BAD_VALUES[bad]
    state = _state()
    spoil(state)
    source = _write(tmp_path, fmt, state)
    one_error_line(_import(tmp_path, *source, "--data", small_sketch_root), Path(source[0]).name, *fragments)
    _nothing_written(tmp_path)


def test_a_bad_start_is_refused_too(small_sketch_root, tmp_path):
    source = _write(tmp_path, "state dict", _state())
    start_state = _state(1)
    _nan(start_state)
    start_state["conv1.0.weight"][0] = float("nan")
    start = _write(tmp_path, "state dict", start_state, name="start")[0]
    one_error_line(_import(tmp_path, *source, "--data", small_sketch_root, "--start", start), "--start",
                   "conv1.0.weight", "NaN")
    _nothing_written(tmp_path)


# --- G: the start file --------------------------------------------------------------------------------------

def test_an_existing_start_file_is_reused_refused_or_never_followed(small_sketch_root, tmp_path):
    start = _write(tmp_path, "state dict", _state(9), name="start")[0]
    first = _write(tmp_path, "state dict", _state(0), name="a")[0]
    result = _import(tmp_path, first, "--model", ARCH, "--data", small_sketch_root, "--start", start)
    assert result.exit_code == 0, result.output
    [stored] = (tmp_path / "checkpoints" / "imported").glob("start-*.safetensors")
    inode = stored.stat().st_ino
    # Identical: reused as it is (the same file, not a copy over it).
    second = _write(tmp_path, "state dict", _state(1), name="b")[0]
    result = _import(tmp_path, second, "--model", ARCH, "--data", small_sketch_root, "--start", start)
    assert result.exit_code == 0, result.output
    assert stored.stat().st_ino == inode
    # Different tensors under that name: refused, the file as it was.
    other = {k: v + 1 if v.is_floating_point() else v for k, v in load_file(str(stored)).items()}
    save_file(other, str(stored))
    before = stored.read_bytes()
    third = _write(tmp_path, "state dict", _state(2), name="c")[0]
    one_error_line(_import(tmp_path, third, "--model", ARCH, "--data", small_sketch_root, "--start", start),
                   stored.name, "never replaced")
    assert stored.read_bytes() == before
    assert not (tmp_path / "checkpoints" / "imported" / "00-c").exists()
    # A link at the name: refused, and the file it names is untouched.
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    stored.unlink()
    stored.symlink_to(outside)
    one_error_line(_import(tmp_path, third, "--model", ARCH, "--data", small_sketch_root, "--start", start),
                   "symbolic link")
    assert outside.read_bytes() == b"precious" and stored.is_symlink()


def test_an_ingredient_folder_that_is_a_link_is_never_written_through(small_sketch_root, tmp_path):
    source = _write(tmp_path, "state dict", _state(), name="a")[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "checkpoints" / "imported").mkdir(parents=True)
    (tmp_path / "checkpoints" / "imported" / "00-a").symlink_to(elsewhere)
    one_error_line(_import(tmp_path, source, "--model", ARCH, "--data", small_sketch_root), "symbolic link")
    assert not list(elsewhere.iterdir())


# --- I: damaged and foreign files ----------------------------------------------------------------------------

def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the stored bytes of a tensor of torch.save's zip (the CRC no longer matches)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        where = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("fmt", ["timm folder", "Lightning ckpt", "state dict"])
def test_a_zip_checkpoint_with_damaged_tensor_bytes_is_refused(small_sketch_root, tmp_path, fmt):
    source = _write(tmp_path, fmt, _state())
    path = Path(source[0])
    _flip_tensor_byte(path / "model_best.pth.tar" if path.is_dir() else path)
    one_error_line(_import(tmp_path, *source, "--data", small_sketch_root), "damaged", "checksum")
    _nothing_written(tmp_path)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_device_behind_a_link_is_not_a_regular_file(small_sketch_root, tmp_path, suffix):
    (tmp_path / f"zero{suffix}").symlink_to("/dev/zero")
    for args in ([f"zero{suffix}", "--model", ARCH], [*_write(tmp_path, "state dict", _state()), "--start",
                                                      f"zero{suffix}"]):
        one_error_line(_import(tmp_path, *args, "--data", small_sketch_root), f"zero{suffix}",
                       "not a regular file")


@pytest.mark.parametrize("text, cause", [("hello, these are not weights\n", "a text file"),
                                         ("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n",
                                          "Git LFS pointer"),
                                         ("<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page")])
def test_a_text_file_names_its_cause(small_sketch_root, tmp_path, text, cause):
    (tmp_path / "weights.pth").write_text(text)
    one_error_line(_import(tmp_path, "weights.pth", "--model", ARCH, "--data", small_sketch_root), cause)


def test_a_pickle_is_still_refused_before_anything_runs(small_sketch_root, tmp_path):
    """The CRC check reads a zip's members' bytes, never unpickles them."""
    marker = tmp_path / "marker"
    torch.save({"state_dict": _state(), "hook": _Marker(marker)}, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"hook": _Marker(marker)}, f)
    for name in ("evil.pth", "evil.pt"):
        one_error_line(_import(tmp_path, name, "--model", ARCH, "--data", small_sketch_root), "refused")
    assert not marker.exists()
