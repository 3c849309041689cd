"""Reading a recipe's YAML tree into its typed sections, strictly, and checking each value's range.

`build` fills a dataclass (soup.recipe.spec's sections) from a mapping: an unknown key, a wrong type or a
missing value is one `SoupError` naming the dotted key, with a close match when there is one.
`check_values` then refuses what is well-typed but out of range (a negative lr, a seed numpy refuses).
Nothing here knows the sections by import: soup.recipe.spec defines them and calls in.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal

from soup.errors import SoupError

IMAGE_SIZES = (8, 4096)  # data.image_size: smaller cannot go through a backbone, larger cannot fit memory
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a recipe name is a folder under --out, nothing else
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# Rates (lr, min_lr, weight decay, lr drop factor, the probe's lr) above this train nothing, and far above it
# they overflow float32 inside an optimizer step: AdamW divides lr by 1 - beta1^t and multiplies it by the
# weight decay, so lr 1e38 crashed its first step. Products of rates within it stay far below float32's max.
MAX_RATE = 1e4
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: a larger number becomes inf there
# Images reach the model scaled to [0, 1], then (x - mean) / std. A mean far outside that range is a 0-255
# figure (or a typo), and a tiny std blows the inputs up: within these bounds every normalised value stays
# under 11 / 1e-3 = 11,000, inside float16's 65,504 under AMP, while every published normalisation (ImageNet's,
# CLIP's, 0.5/0.5, 0/1) fits. The same check reads the mean/std that `soup import` takes from a source.
MEAN_BOUND = 10.0
STD_RANGE = (1e-3, 10.0)
# More epochs than this is a typo (an exponent too many), not a fine-tune: 10,000 epochs of the 20,000-image
# reference split are 200 million images, weeks on one GPU. Like the sweep's cap of ingredients.
MAX_EPOCHS = 10_000


def close_match(word: str, options, prefix: str = "") -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _type_name(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# Scalar annotation -> (Python types a YAML value may have, what the error line calls it).
SCALARS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
           str: (str, "a string")}


def coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it, converted where YAML is ambiguous."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return build(arg, value, where)  # its own errors name the inner key
            try:
                return coerce(value, arg, where)
            except SoupError:
                pass
        raise SoupError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off`/`none`-like word as a boolean
            value = next((c for c in (("on", "true") if value else ("off", "none", "false")) if c in choices),
                         value)
        if value not in choices:
            hint = close_match(str(value), [str(c) for c in choices])
            raise SoupError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SoupError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise SoupError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `5e-3` (no dot) as a string; a user means the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in SCALARS:
        accepted, name = SCALARS[tp]
        # bool is an int in Python, but `true` is no number in a recipe.
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise SoupError(f"{where}: expected {name}, got {value!r}")
        return float(value) if tp is float else value
    raise TypeError(f"unsupported annotation {tp!r}")  # pragma: no cover - programming error


def build(cls, data: Any, where: str):
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise SoupError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise SoupError(f"unknown key '{prefix}{key}'{close_match(str(key), fields, prefix)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SoupError(f"missing required key '{prefix}{name}'")
    return cls(**values)


def _seed(value: int) -> bool:
    return 0 <= value < 2**32  # what numpy and every RNG soup seeds accept


def check_values(recipe) -> None:
    d, m, t = recipe.data, recipe.model, recipe.train
    checks = [
        (IMAGE_SIZES[0] <= d.image_size <= IMAGE_SIZES[1], "data.image_size",
         f"must be {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} pixels"),
        (len(d.mean) == 3 and len(d.std) == 3, "data.mean/data.std", "need three values (RGB)"),
        *normalisation_checks(d.mean, d.std),
        (_seed(d.holdout_seed), "data.holdout_seed", "must be in [0, 2^32)"),
        (_seed(m.init_seed), "model.init_seed", "must be in [0, 2^32)"),
        (_seed(t.seed), "train.seed", "must be in [0, 2^32)"),
        (0.0 <= d.holdout < 1.0, "data.holdout", "must be in [0, 1)"),
        (0.0 <= m.freeze <= 1.0, "model.freeze", "must be in [0, 1]"),
        (1 <= t.epochs <= MAX_EPOCHS, "train.epochs",
         f"must be at least 1 and at most {MAX_EPOCHS:,}, not {t.epochs:,}"),
        (t.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (0 < t.lr <= MAX_RATE, "train.lr", f"must be a positive number, at most {MAX_RATE:g}"),
        (0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)"),
        (0 <= t.weight_decay <= MAX_RATE, "train.weight_decay", f"must be a number from 0 to {MAX_RATE:g}"),
        (0 < t.lr_drop_factor <= MAX_RATE, "train.lr_drop_factor",
         f"must be a positive number, at most {MAX_RATE:g}"),
        (DEVICE.fullmatch(t.device), "train.device", f"must be auto, cpu, cuda or cuda:N, not {t.device!r}"),
        (t.num_workers >= 0, "train.num_workers", "must be 0 or more"),
        (t.lr_drop_epoch is None or t.lr_drop_epoch >= 1, "train.lr_drop_epoch", "must be at least 1"),
        *_training_checks(t),
        *_probe_checks(m.probe),
        *_search_checks(recipe.search, t, m.probe),
        (NAME.fullmatch(recipe.name), "name", f"must be a folder name of at most 100 letters, digits, '.', '_' or '-', "
         f"starting with a letter or digit, not {recipe.name!r}"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise SoupError(f"{key} {why}")
    parse_backbone(m.backbone)


def normalisation_checks(mean: list[float], std: list[float]) -> list[tuple[bool, str, str]]:
    """data.mean and data.std finite and within MEAN_BOUND / STD_RANGE (NaN fails every comparison): the
    recipe check's, and a checkpoint's recorded recipe's (soup.models.metadata)."""
    low, high = STD_RANGE
    why = "images are scaled to [0, 1] before normalising"
    return [
        (all(math.isfinite(m) and abs(m) <= MEAN_BOUND for m in mean), "data.mean",
         f"must be finite numbers from {-MEAN_BOUND:g} to {MEAN_BOUND:g}, not {_listed(mean)}: {why} "
         "(ImageNet's mean is [0.485, 0.456, 0.406])"),
        (all(math.isfinite(s) and low <= s <= high for s in std), "data.std",
         f"must be finite numbers from {low:g} to {high:g}, not {_listed(std)}: {why} "
         "(ImageNet's std is [0.229, 0.224, 0.225])"),
    ]


def _listed(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _training_checks(t) -> list[tuple[bool, str, str]]:
    return [
        (0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)"),
        (t.warmup_epochs >= 0, "train.warmup_epochs", "must be 0 or more"),
        (t.warmup_epochs < t.epochs, "train.warmup_epochs", "must be less than train.epochs"),
        (0 <= t.min_lr <= MAX_RATE, "train.min_lr", f"must be 0 or more, at most {MAX_RATE:g}"),
        (t.schedule != "cosine" or t.min_lr <= t.lr, "train.min_lr", "must be at most train.lr"),
        (t.layer_decay is None or 0.0 < t.layer_decay <= 1.0, "train.layer_decay", "must be in (0, 1] or null"),
        # inf would pass the check yet clip nothing; nan would turn every gradient into nan.
        (t.grad_clip is None or 0 < t.grad_clip < math.inf, "train.grad_clip",
         f"must be positive or null, and finite, not {t.grad_clip}: leave it out or set it to null to turn "
         "clipping off"),
        (t.ema is None or 0.0 < t.ema < 1.0, "train.ema", "must be a decay in (0, 1) (e.g. 0.999) or null"),
        # torch draws Beta(alpha, alpha) in float32: an alpha of inf there mixes nothing, silently.
        (0 <= t.mixup <= FLOAT32_MAX, "train.mixup", "must be 0 (off) or a positive alpha, finite in float32"),
        (0 <= t.cutmix <= FLOAT32_MAX, "train.cutmix", "must be 0 (off) or a positive alpha, finite in float32"),
    ]


def _probe_checks(probe) -> list[tuple[bool, str, str]]:
    if probe is None:
        return []
    return [
        (1 <= probe.epochs <= MAX_EPOCHS, "model.probe.epochs",
         f"must be at least 1 and at most {MAX_EPOCHS:,}, not {probe.epochs:,}"),
        (0 < probe.lr <= MAX_RATE, "model.probe.lr", f"must be positive, at most {MAX_RATE:g}"),
        (probe.batch_size is None or probe.batch_size >= 1, "model.probe.batch_size", "must be at least 1"),
    ]


def _search_checks(search, t, probe) -> list[tuple[bool, str, str]]:
    if search is None:
        return []
    prune, rungs = search.prune, search.prune.rungs if search.prune else []
    return [
        (search.max_trials is None or search.max_trials >= search.trials, "search.max_trials",
         f"must be at least search.trials ({search.trials})"),
        (search.max_trials is None or prune is not None, "search.max_trials",
         "draws more only to replace pruned draws; add search.prune (rule, at) or remove it"),
        (prune is None or bool(rungs), "search.prune.at", "needs at least one epoch"),
        (all(1 <= e < t.epochs for e in rungs), "search.prune.at",
         f"must name epochs from 1 to {t.epochs - 1} (before train.epochs, {t.epochs}), not {prune and prune.at!r}"),
        (prune is None or prune.rule != "start" or probe is not None, "search.prune.rule",
         "start compares each draw with its probed start, and this recipe has no model.probe; add model.probe "
         "or use rule: median"),
    ]


def parse_backbone(spec: str) -> tuple[str, str, str]:
    """`hub:<repo or dir>:<entry>` or `timm:<name>` -> (kind, source, entry)."""
    kind, _, rest = spec.partition(":")
    if kind == "timm" and rest:
        return "timm", "", rest
    if kind == "hub":
        source, _, entry = rest.rpartition(":")
        if source and entry:
            return "hub", source, entry
    raise SoupError(
        f"model.backbone: cannot read {spec!r}; write hub:<github owner/repo or local dir>:<entry> "
        "(e.g. hub:facebookresearch/dinov2:dinov2_vitb14) or timm:<model name>"
    )
