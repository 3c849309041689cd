"""Recipes: YAML files validated strictly before any compute is spent.

A misspelled key, a wrong type or a missing value is one `SoupError` naming the key, with a close match
when there is one. Sweeps expand into one resolved recipe per ingredient.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from soup import search
from soup.errors import SoupError

Augment = Literal["none", "hflip", "crop_hflip", "randaugment", "trivialaugment", "autoaugment"]
AUGMENTS = typing.get_args(Augment)
MAX_INGREDIENTS = search.MAX_INGREDIENTS  # a sweep's combinations: more is a typo (100,000 would take minutes to list)
MAX_VALUES = 100_000  # values in a recipe with every YAML alias expanded; a real recipe has under 100
MAX_DEPTH = 50  # nesting levels of a recipe
IMAGE_SIZES = (8, 4096)  # data.image_size: smaller cannot go through a backbone, larger cannot fit memory
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a recipe name is a folder under --out, nothing else
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass
class DataConfig:
    root: str
    image_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Fraction of each train class kept out of training to select soups on; the same slice for every
    # ingredient because it is drawn with holdout_seed, not the training seed.
    holdout: float = 0.0
    holdout_seed: int = 0
    # Training only; see soup.augment for what each one does.
    augment: Augment = "none"
    skip_bad_images: bool = False


@dataclass
class ProbeConfig:
    """Train the head alone on the frozen backbone before the ingredients start from it (LP-FT)."""

    epochs: int
    lr: float
    optimizer: Literal["sgd", "adamw"] = "adamw"
    batch_size: Optional[int] = None  # null: train.batch_size


@dataclass
class ModelConfig:
    backbone: str
    pretrained: bool = True
    weights: Optional[str] = None
    kwargs: dict = field(default_factory=dict)
    freeze: float = 0.0
    # Weights not loaded from a file (the head; the whole model when pretrained is false) are initialised
    # from this seed, not the training seed, so that every ingredient of a sweep starts from the same
    # weights: soups need a shared start.
    init_seed: int = 0
    probe: Optional[ProbeConfig] = None


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 5.0e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_drop_epoch: Optional[int] = None
    lr_drop_factor: float = 0.1
    amp: Literal["fp16", "bf16", "off"] = "fp16"
    seed: int = 0
    num_workers: int = 4
    device: str = "auto"
    compile: bool = False
    label_smoothing: float = 0.0
    schedule: Literal["step", "cosine"] = "step"  # step: lr_drop_epoch/lr_drop_factor; cosine: to min_lr
    warmup_epochs: float = 0.0  # linear warm-up, per step, for either schedule
    min_lr: float = 0.0
    layer_decay: Optional[float] = None  # ViTs: block i's lr scaled by layer_decay^(depth - i)
    grad_clip: Optional[float] = None  # max global gradient norm
    ema: Optional[float] = None  # decay of an exponential moving average of the trained weights
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0


@dataclass
class SearchConfig:
    """A random search: `trials` draws of the `space` (dotted key -> distribution, see soup.search)."""

    trials: int
    space: dict
    seed: int = 0


@dataclass
class Recipe:
    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: dict = field(default_factory=dict)
    search: Optional[SearchConfig] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _close_match(word: str, options, prefix: str = "") -> str:
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


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it, converted where YAML is ambiguous."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _build(arg, value, where)  # its own errors name the inner key
            try:
                return _coerce(value, arg, where)
            except SoupError:
                pass
        raise SoupError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off`/`none`-like word as a boolean
            value = next((c for c in (("on", "true") if value else ("off", "none", "false")) if c in choices),
                         value)
        if value not in choices:
            hint = _close_match(str(value), [str(c) for c in choices])
            raise SoupError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SoupError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise SoupError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SoupError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SoupError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `5e-3` (no dot) as a string; a user means the number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SoupError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SoupError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r}")  # pragma: no cover - programming error


def _build(cls, data: Any, where: str):
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise SoupError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise SoupError(f"unknown key '{prefix}{key}'{_close_match(str(key), fields, prefix)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SoupError(f"missing required key '{prefix}{name}'")
    return cls(**values)


def _seed(value: int) -> bool:
    return 0 <= value < 2**32  # what numpy and every RNG soup seeds accept


def _check_values(recipe: Recipe) -> None:
    d, m, t = recipe.data, recipe.model, recipe.train
    finite = math.isfinite
    checks = [
        (IMAGE_SIZES[0] <= d.image_size <= IMAGE_SIZES[1], "data.image_size",
         f"must be {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} pixels"),
        (len(d.mean) == 3 and len(d.std) == 3, "data.mean/data.std", "need three values (RGB)"),
        (all(map(finite, d.mean)), "data.mean", "must be finite numbers"),
        (all(s > 0 and finite(s) for s in d.std), "data.std", "must be positive finite numbers"),
        (_seed(d.holdout_seed), "data.holdout_seed", "must be in [0, 2^32)"),
        (_seed(m.init_seed), "model.init_seed", "must be in [0, 2^32)"),
        (_seed(t.seed), "train.seed", "must be in [0, 2^32)"),
        (0.0 <= d.holdout < 1.0, "data.holdout", "must be in [0, 1)"),
        (0.0 <= m.freeze <= 1.0, "model.freeze", "must be in [0, 1]"),
        (t.epochs >= 1, "train.epochs", "must be at least 1"),
        (t.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (t.lr > 0 and finite(t.lr), "train.lr", "must be a positive finite number"),
        (0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)"),
        (t.weight_decay >= 0 and finite(t.weight_decay), "train.weight_decay", "must be a finite number, 0 or more"),
        (t.lr_drop_factor > 0 and finite(t.lr_drop_factor), "train.lr_drop_factor",
         "must be a positive finite number"),
        (DEVICE.fullmatch(t.device), "train.device", f"must be auto, cpu, cuda or cuda:N, not {t.device!r}"),
        (t.num_workers >= 0, "train.num_workers", "must be 0 or more"),
        (t.lr_drop_epoch is None or t.lr_drop_epoch >= 1, "train.lr_drop_epoch", "must be at least 1"),
        *_training_checks(t),
        *_probe_checks(m.probe),
        (NAME.fullmatch(recipe.name), "name", f"must be a folder name of at most 100 letters, digits, '.', '_' or '-', "
         f"starting with a letter or digit, not {recipe.name!r}"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise SoupError(f"{key} {why}")
    parse_backbone(m.backbone)


def _training_checks(t: TrainConfig) -> list[tuple[bool, str, str]]:
    return [
        (0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)"),
        (t.warmup_epochs >= 0, "train.warmup_epochs", "must be 0 or more"),
        (t.warmup_epochs < t.epochs, "train.warmup_epochs", "must be less than train.epochs"),
        (t.min_lr >= 0, "train.min_lr", "must be 0 or more"),
        (t.schedule != "cosine" or t.min_lr <= t.lr, "train.min_lr", "must be at most train.lr"),
        (t.layer_decay is None or 0.0 < t.layer_decay <= 1.0, "train.layer_decay", "must be in (0, 1] or null"),
        (t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be positive or null"),
        (t.ema is None or 0.0 < t.ema < 1.0, "train.ema", "must be a decay in (0, 1) (e.g. 0.999) or null"),
        (t.mixup >= 0, "train.mixup", "must be 0 (off) or a positive alpha"),
        (t.cutmix >= 0, "train.cutmix", "must be 0 (off) or a positive alpha"),
    ]


def _probe_checks(probe: ProbeConfig | None) -> list[tuple[bool, str, str]]:
    if probe is None:
        return []
    return [
        (probe.epochs >= 1, "model.probe.epochs", "must be at least 1"),
        (probe.lr > 0, "model.probe.lr", "must be positive"),
        (probe.batch_size is None or probe.batch_size >= 1, "model.probe.batch_size", "must be at least 1"),
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


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe subset, refusing a key written twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: overriding merged keys is the point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise SoupError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}; write each key once")
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader says so itself
                pass
        return super().construct_mapping(node, deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def _check_size(value: Any, memo: dict, active: set, depth: int = 0) -> int:
    """How many values `value` holds with every YAML alias expanded (each shared node is counted once per
    use, in time linear in the distinct nodes): an alias bomb is refused before anything expands it."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in active:
        raise SoupError("a YAML alias refers to a value that contains it; write the value out")
    if depth > MAX_DEPTH:
        raise SoupError(f"values nested more than {MAX_DEPTH} levels deep; a recipe needs a few")
    if id(value) not in memo:
        active.add(id(value))
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(_check_size(child, memo, active, depth + 1) for child in children)
        active.discard(id(value))
        if memo[id(value)] > MAX_VALUES:
            raise SoupError(f"more than {MAX_VALUES:,} values once YAML aliases are expanded (the cap of a "
                            "recipe); write the values out or use fewer aliases")
    return memo[id(value)]


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise SoupError(f"cannot set '{dotted}': '{'.'.join(keys[:depth + 1])}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 1e-3); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SoupError(f"--set {text!r}: write key.path=value, e.g. --set train.epochs=2")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except SoupError as err:
        raise SoupError(f"--set {text!r}: {err}") from None
    return key.strip(), value


def _check_settings(tree: dict, settings: dict) -> None:
    """Validate the recipe `tree` with `settings` (dotted key -> value) set, as an ingredient gets it."""
    resolved = copy.deepcopy(tree)
    resolved.pop("sweep", None)
    resolved.pop("search", None)
    for key, value in settings.items():
        _set_path(resolved, key, value)
    _check_values(_build(Recipe, resolved, ""))


def recipe_from_dict(raw: dict, overrides: list[tuple[str, Any]] = ()) -> Recipe:
    _check_size([raw, *(value for _, value in overrides)], {}, set())
    tree = copy.deepcopy(raw)
    for key, value in overrides:
        _set_path(tree, key, value)
    recipe = _build(Recipe, tree, "")
    _check_values(recipe)
    for key, values in recipe.sweep.items():
        if not isinstance(values, list) or not values:
            raise SoupError(f"sweep.{key}: expected a non-empty list of values, got {values!r}")
        if key.split(".")[0] in search.SECTIONS:
            raise SoupError(f"sweep.{key}: a sweep cannot sweep itself or the search")
    combinations = math.prod(len(values) for values in recipe.sweep.values())
    if combinations > MAX_INGREDIENTS:
        sizes = " x ".join(str(len(values)) for values in recipe.sweep.values())
        raise SoupError(f"sweep: {sizes} = {combinations:,} ingredients, more than the cap of {MAX_INGREDIENTS:,}; "
                        "split it into several recipes")
    for key, values in recipe.sweep.items():
        # Validate every swept value now, not hours later when its ingredient starts.
        for value in values:
            try:
                _check_settings(tree, {key: value})
            except SoupError as err:
                raise SoupError(f"sweep.{key}={value!r}: {err}") from None
    if recipe.search is not None:
        s = recipe.search
        search.check(s.space, s.trials, s.seed, recipe.sweep, lambda settings: _check_settings(tree, settings))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | list[tuple[str, Any]] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise SoupError(f"recipe {path}: no such file; recipes/ holds the shipped ones")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SoupError(f"recipe {path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as "
                        "UTF-8") from None
    try:
        raw = _yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SoupError(f"recipe {path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except SoupError as err:
        raise SoupError(f"recipe {path} {err}") from None
    except RecursionError:
        raise SoupError(f"recipe {path}: values nested too deeply to read; a recipe needs a few levels") from None
    parsed = [parse_override(o) if isinstance(o, str) else o for o in overrides]
    try:
        return recipe_from_dict(raw if raw is not None else {}, parsed)
    except SoupError as err:
        raise SoupError(f"recipe {path}: {err}") from None


@dataclass
class Ingredient:
    index: int
    id: str
    recipe: Recipe
    settings: dict  # every value set for this ingredient: its grid values, then its drawn ones
    sweep_ids: list[str] = field(default_factory=list)  # every ingredient of its sweep, itself included
    drawn: dict = field(default_factory=dict)  # the values the random search drew for it (sorted keys)


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)


def expand_sweep(recipe: Recipe) -> list[Ingredient]:
    """One resolved recipe per ingredient: every combination of the sweep's values (in the order the sweep
    lists them), times every trial of the search when there is one (trial-major, so that raising
    search.trials appends ingredients and keeps the ids of those already there)."""
    base = recipe.to_dict()
    base["sweep"], base["search"] = {}, None
    keys = list(recipe.sweep)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(recipe.sweep[k] for k in keys))]
    s = recipe.search
    trials = search.draw_trials(s.space, s.trials, s.seed) if s is not None else [{}]
    ingredients = []
    for index, (drawn, combo) in enumerate(itertools.product(trials, grid)):
        settings = {**combo, **drawn}
        try:
            resolved = recipe_from_dict(base, list(settings.items()))
        except SoupError as err:  # values valid one by one, not together (e.g. train.min_lr > train.lr)
            raise SoupError(f"ingredient {index} ({search.describe(settings)}): {err}") from None
        parts = [f"{index:02d}"] + [f"{k.split('.')[-1]}{_slug(v)}" for k, v in settings.items()]
        ingredients.append(Ingredient(index, "-".join(parts), resolved, settings, drawn=drawn))
    ids = [item.id for item in ingredients]
    for item in ingredients:
        item.sweep_ids = ids
    return ingredients
