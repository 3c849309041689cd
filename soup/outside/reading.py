"""Reading a checkpoint another tool wrote, without running anything it names.

A SOURCE is a timm train.py output folder, a Hub-style folder (config.json + model.safetensors or
pytorch_model.bin: timm's save_for_hf, soup export), a Lightning .ckpt, a safetensors file, or a
.pth/.pth.tar/.pt/.bin pickle holding a state dict or a dict with one. Every pickle goes through
torch.load(weights_only=True) with one more plain type allowed, argparse.Namespace (timm's `args`); a file
that needs any other is refused in one line naming what it asked for, and nothing it names runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from soup.errors import SoupError
from soup.models.checkpoint import is_soup_checkpoint
from soup.text import printable

# The only class a checkpoint may name besides what weights_only allows already (tensors, containers,
# numbers, strings): timm's train.py saves its parsed command line as `args`.
PLAIN_TYPES = [argparse.Namespace]
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
# Where a dict holding weights keeps them, tried in this order (timm, Lightning, common training loops).
STATE_KEYS = ("state_dict", "model", "module", "model_state_dict", "net", "network")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
# Lightning hyper_parameters / a plain dict's entries that may name the timm architecture or the classes.
ARCH_KEYS = ("arch", "architecture", "model_name", "model", "backbone", "timm_model")
CLASS_KEYS = ("classes", "class_names", "label_names", "labels")
TIMM_BEST = ("model_best.pth.tar", "last.pth.tar")


@dataclass
class Source:
    """What one SOURCE holds, before it is fitted to a model: its tensors in its own key names and what
    it records about the model and its preprocessing (None: not recorded)."""

    given: Path  # as named on the command line
    file: Path  # the file the tensors came from
    format: str
    state: dict[str, torch.Tensor]
    weights: str  # which entry of the file holds them ("state_dict_ema", "state_dict", "whole file")
    arch: str | None = None
    arch_from: str | None = None
    model_args: dict = field(default_factory=dict)
    classes: list[str] | None = None
    num_classes: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    crop: str | None = None  # how the source evaluated, when not soup's whole-image resize
    metric: float | None = None
    epoch: int | None = None
    hub_id: str | None = None  # owner/name, for a folder of the Hugging Face cache (models--owner--name/snapshots/)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def load_pickle(path: Path) -> object:
    """torch.load(weights_only=True) with PLAIN_TYPES allowed; anything else is one refusal line."""
    _check_zip(path)
    try:
        # A legacy pickle's protocol draws a warning from torch besides the refusal: the refusal says it all.
        with torch.serialization.safe_globals(PLAIN_TYPES), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if zipfile.is_zipfile(path):  # mapped, not read: an optimizer's state beside the weights costs no memory
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path) and _text_file(path):  # text read as pickle opcodes: say it is text
            raise SoupError(f"{path}: {_text_file(path)}; name a .pth, .pt, .bin, .ckpt or .safetensors file, "
                            "or a timm or Hub folder") from None
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"the Python object {wanted.group(1)}" if wanted else "more than tensors and plain values"
        raise SoupError(f"{path}: refused: reading it would need {what}, not one of the plain types a checkpoint "
                        "may hold (tensors, numbers, strings, lists, dicts, argparse.Namespace); nothing in it was "
                        "run. Save the weights alone (torch.save(model.state_dict(), FILE)) and import that") from None
    except Exception as err:  # zip, truncated file, not a pickle: each raises its own type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        cause = _text_file(path) or f"cannot read it as a checkpoint ({type(err).__name__}: {first})"
        raise SoupError(f"{path}: {cause}; name a .pth, .pt, .bin, .ckpt or .safetensors file, or a timm or Hub "
                        "folder") from None


def _check_zip(path: Path) -> None:
    """A zip checkpoint (torch.save's format) whose members' bytes do not match their CRCs is damaged:
    torch's reader checks them only for some records, so a flipped bit in a tensor would import as a weight.
    The file is read whole for its sha256 anyway; this reads it once more."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as err:
        raise SoupError(f"{path}: a damaged zip checkpoint ({err}); copy or download it again") from None
    if bad is not None:
        raise SoupError(f"{path}: damaged: the bytes of {printable(bad)} in it do not match their checksum (CRC); "
                        "copy or download it again")


def _text_file(path: Path) -> str | None:
    """What a file that is text holds, said as the cause of a failed read (None: not text)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a character cut at the end of the sample is still text
        if err.start < len(head) - 3:
            return None
        text = head[:err.start].decode("utf-8")
    if not text or "\x00" in text:
        return None
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the weights (fetch them: git lfs pull)"
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "an HTML page, not a checkpoint (a download that saved an error or login page?)"
    first = printable(text.strip().splitlines()[0][:40]) if text.strip() else ""
    return f"a text file, not a checkpoint (it begins {first!r})"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SoupError(f"{path}: not a readable safetensors file ({err})") from None


def _as_plain(value) -> dict:
    """timm's `args` (a Namespace) or a dict, as a dict; anything else as empty."""
    if isinstance(value, argparse.Namespace):
        return vars(value)
    return value if isinstance(value, dict) else {}


def _tensors(state, path: Path, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SoupError(f"{path}: {where} is not a dict of named tensors; save model.state_dict() and import that")
    return state


def _weights_of(loaded, path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors, the entry they came from) of a loaded file: the whole file when it is a state dict,
    else the first of STATE_KEYS (EMA_KEYS with --ema)."""
    if not isinstance(loaded, dict):
        raise SoupError(f"{path}: holds a {type(loaded).__name__}, not a state dict or a dict holding one")
    keys = EMA_KEYS if ema else STATE_KEYS
    for key in keys:
        if isinstance(loaded.get(key), dict):
            return _tensors(loaded[key], path, f"its {key!r}"), key
    if ema:
        raise SoupError(f"{path}: --ema, but it holds no EMA weights (none of {', '.join(EMA_KEYS)}; it has "
                        f"{', '.join(map(str, list(loaded)[:8]))}); drop --ema")
    return _tensors(loaded, path, "the file"), "whole file"


def _record_from(source: Source, values: dict, where: str) -> None:
    """Fill what `values` (timm's args, Lightning's hyper_parameters) records about the model and data."""
    arch = next((values[k] for k in ARCH_KEYS if isinstance(values.get(k), str) and values[k]), None)
    if arch and source.arch is None:
        source.arch, source.arch_from = arch, where
    if isinstance(values.get("num_classes"), int) and source.num_classes is None:
        source.num_classes = values["num_classes"]
    classes = next((values[k] for k in CLASS_KEYS if isinstance(values.get(k), (list, tuple))), None)
    if classes and all(isinstance(c, str) for c in classes) and source.classes is None:
        source.classes = list(classes)
    if isinstance(values.get("model_kwargs"), dict):
        source.model_args = {**values["model_kwargs"], **source.model_args}
    if isinstance(values.get("gp"), str) and values["gp"]:  # timm train.py's --gp: same tensors, other logits
        source.model_args.setdefault("global_pool", values["gp"])
    size = values.get("input_size") or values.get("img_size") or values.get("image_size")
    if isinstance(size, (list, tuple)) and size:
        size = size[-1]
    if isinstance(size, int) and source.image_size is None:
        source.image_size = size
    for name in ("mean", "std"):
        value = values.get(name)
        if isinstance(value, (list, tuple)) and len(value) == 3 and getattr(source, name) is None:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise SoupError(f"{source.given}: {where} records {name} {printable(repr(list(value)))[:80]}, "
                                "not three numbers; fix it there, or import the weights file alone with --model")
            setattr(source, name, [float(v) for v in value])
    crop_pct = values.get("crop_pct")
    if isinstance(crop_pct, (int, float)) and crop_pct != 1.0 and source.crop is None:
        source.crop = f"crop_pct {crop_pct:g}"


def _checkpoint_file(path: Path, ema: bool, fmt: str) -> Source:
    """A pickle: a timm CheckpointSaver file, a Lightning .ckpt or a plain state dict (or a dict with one)."""
    loaded = load_pickle(path)
    state, entry = _weights_of(loaded, path, ema)
    if isinstance(loaded, dict) and isinstance(loaded.get("pytorch-lightning_version"), str):
        fmt = "Lightning checkpoint"
    elif isinstance(loaded, dict) and ("arch" in loaded and "state_dict" in loaded):
        fmt = "timm train.py checkpoint"
    source = Source(path, path, fmt, state, entry)
    if isinstance(loaded, dict):
        if isinstance(loaded.get("arch"), str):
            source.arch, source.arch_from = loaded["arch"], f"{path.name}'s arch"
        for key, where in (("args", "args"), ("hyper_parameters", "hyper_parameters"),
                           ("datamodule_hyper_parameters", "datamodule hyper_parameters")):
            _record_from(source, _as_plain(loaded.get(key)), f"{path.name}'s {where}")
        if entry == "whole file":
            _record_from(source, {k: v for k, v in loaded.items() if not isinstance(v, torch.Tensor)}, path.name)
        metric = loaded.get("metric")
        source.metric = float(metric) if isinstance(metric, (int, float)) else None
        source.epoch = loaded.get("epoch") if isinstance(loaded.get("epoch"), int) else None
    return source


def _timm_run(folder: Path, ema: bool) -> Source:
    """timm train.py's output folder: its best checkpoint, else its last, else its latest checkpoint-N."""
    named = [folder / name for name in TIMM_BEST if (folder / name).is_file()]
    numbered = sorted(folder.glob("checkpoint-*.pth.tar"),
                      key=lambda p: int(m.group(1)) if (m := re.search(r"-(\d+)\.pth\.tar$", p.name)) else -1)
    files = named or numbered[::-1]
    if not files:
        raise SoupError(f"{folder}: a folder without config.json, model_best.pth.tar, last.pth.tar or "
                        "checkpoint-N.pth.tar; name the checkpoint file itself")
    source = _checkpoint_file(files[0], ema, "timm train.py checkpoint")
    source.given, source.format = folder, "timm train.py folder"
    args_file = folder / "args.yaml"
    if args_file.is_file():
        try:
            recorded = yaml.safe_load(args_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise SoupError(f"{args_file}: not readable YAML ({str(err).splitlines()[0]}); fix or remove it") from None
        args = _as_plain(recorded)
        if isinstance(args.get("model"), str):  # args.yaml is what the run was started with: it wins
            source.arch, source.arch_from = args["model"], "args.yaml"
        _record_from(source, args, "args.yaml")
    return source


def _hub_folder(folder: Path) -> Source:
    """A Hub-style folder: config.json as timm's save_for_hf (and soup export) writes it, and its weights."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SoupError(f"{config_file}: not valid JSON ({err}); fix it or name the weights file itself") from None
    if not isinstance(config, dict):
        raise SoupError(f"{config_file}: not a JSON object; fix it or name the weights file itself")
    weights = folder / "model.safetensors"
    if weights.is_file():
        state = _load_safetensors(weights)
    elif (folder / "pytorch_model.bin").is_file():
        weights = folder / "pytorch_model.bin"
        state = _tensors(load_pickle(weights), weights, "the file")
    else:
        raise SoupError(f"{folder}: config.json without model.safetensors or pytorch_model.bin beside it")
    source = Source(folder, weights, "Hub folder", state, "whole file")
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/[^/]+$", folder.resolve().as_posix())
    source.hub_id = f"{cached.group(1)}/{cached.group(2)}" if cached else None
    if isinstance(config.get("architecture"), str):
        source.arch, source.arch_from = config["architecture"], "config.json"
    labels = config.get("label_names")
    if isinstance(labels, dict):  # timm allows {index: name} where ids have gaps
        labels = [labels[k] for k in sorted(labels, key=lambda k: int(k))] if all(
            str(k).isdigit() for k in labels) else None
    source.classes = list(labels) if isinstance(labels, list) and all(isinstance(c, str) for c in labels) else None
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    source.model_args = {k: v for k, v in args.items() if k != "num_classes"}
    source.num_classes = config.get("num_classes") if isinstance(config.get("num_classes"), int) else None
    cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    _record_from(source, {k: cfg.get(k) for k in ("input_size", "mean", "std", "crop_pct")}, "config.json")
    if cfg.get("crop_mode") not in (None, "squash") and source.crop is None and cfg.get("crop_pct", 1.0) != 1.0:
        source.crop = f"crop_pct {cfg.get('crop_pct')}"
    return source


def read_source(given: Path, ema: bool = False) -> Source:
    """The tensors and records of one SOURCE (see the module's docstring)."""
    if given.is_dir():
        if (given / "config.json").is_file():
            if ema:
                raise SoupError(f"{given}: --ema, but a Hub folder holds one set of weights; drop --ema")
            return _hub_folder(given)
        return _timm_run(given, ema)
    if not given.is_file():
        if given.exists():  # a device (/dev/zero, maybe behind a link), a pipe or a socket: reading never ends
            raise SoupError(f"{given}: not a regular file (a device, pipe or socket); name a checkpoint file or "
                            "folder")
        raise SoupError(f"{given}: no such checkpoint file or folder")
    if given.suffix == ".safetensors":
        if is_soup_checkpoint(given):
            raise SoupError(f"{given}: already a soup checkpoint; cook it directly (soup cook {given} ...)")
        if ema:
            raise SoupError(f"{given}: --ema, but a safetensors file holds one set of weights; drop --ema")
        return Source(given, given, "safetensors file", _load_safetensors(given), "whole file")
    if given.suffix not in PICKLE_SUFFIXES:
        raise SoupError(f"{given}: not a checkpoint soup reads (.pth, .pth.tar, .pt, .bin, .ckpt, .safetensors, "
                        "or a timm or Hub folder)")
    return _checkpoint_file(given, ema, "Lightning checkpoint" if given.suffix == ".ckpt" else "state dict file")
