"""Recipes: YAML files validated strictly before any compute is spent.

This module owns the recipe's sections (the dataclasses below, their keys and defaults), turning a file
or a mapping plus overrides into a checked `Recipe`, and expanding a sweep and a search into one resolved
recipe per ingredient. Reading the YAML safely is soup.recipe.files's job; typing each key and checking
each value's range is soup.recipe.checks'. A misspelled key, a wrong type or a missing value is one
`SoupError` naming the key, with a close match when there is one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from soup.errors import SoupError
from soup.recipe import search
# parse_backbone is part of this module's interface (soup.models.backbones and the tests import it from here).
from soup.recipe.checks import build, check_values, parse_backbone  # noqa: F401
from soup.recipe.files import check_size, parse_override, read_recipe_file, set_path

Augment = Literal["none", "hflip", "crop_hflip", "randaugment", "trivialaugment", "autoaugment"]
AUGMENTS = typing.get_args(Augment)
MAX_INGREDIENTS = search.MAX_INGREDIENTS  # a sweep's combinations: more is a typo (100,000 would take minutes to list)


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
    # Training only; see soup.data.augment for what each one does.
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
    # Every BatchNorm layer in eval mode while fine-tuning, keeping the start's running statistics (DiWA,
    # DomainBed): the ingredients then share them bit for bit and soups keep them. Weight and bias still train.
    freeze_bn: bool = False


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
    # Where a run's figures go besides metrics.json and summary.csv (soup.train.logs); not part of what
    # the run computes, so a resume ignores it (see `resumable`).
    log: Literal["tensorboard", "none"] = "tensorboard"


# Keys that change what a run reports, never what it trains: left out wherever recipes are compared.
REPORTING_KEYS = (("train", "log"),)


def resumable(recipe: dict | None) -> dict | None:
    """A recipe dict without its reporting keys: what a resumed or finished run must match."""
    if not isinstance(recipe, dict):
        return recipe
    kept = copy.deepcopy(recipe)
    for section, key in REPORTING_KEYS:
        if isinstance(kept.get(section), dict):
            kept[section].pop(key, None)
    return kept


@dataclass
class PruneConfig:
    """Stop a draw at a rung epoch (`at`, after its val pass) when its val top-1 trails its probed start's
    (`start`) or the median of the draws that reached that rung before it (`median`); soup.train.prune."""

    rule: Literal["start", "median"]
    at: Union[int, list[int]]

    @property
    def rungs(self) -> list[int]:
        return sorted(set(self.at if isinstance(self.at, list) else [self.at]))


@dataclass
class SearchConfig:
    """A random search: `trials` draws of the `space` (dotted key -> distribution, see soup.recipe.search).
    With `prune`, `trials` is the number of finished draws wanted: pruned draws are replaced by the next
    ones, up to `max_trials` drawn in all."""

    trials: int
    space: dict
    seed: int = 0
    max_trials: Optional[int] = None
    prune: Optional[PruneConfig] = None

    @property
    def draws(self) -> int:
        return self.max_trials or self.trials


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


def _check_settings(tree: dict, settings: dict) -> None:
    """Validate the recipe `tree` with `settings` (dotted key -> value) set, as an ingredient gets it."""
    resolved = copy.deepcopy(tree)
    resolved.pop("sweep", None)
    resolved.pop("search", None)
    for key, value in settings.items():
        set_path(resolved, key, value)
    check_values(build(Recipe, resolved, ""))


def recipe_from_dict(raw: dict, overrides: list[tuple[str, Any]] = ()) -> Recipe:
    check_size([raw, *(value for _, value in overrides)], {}, set())
    tree = copy.deepcopy(raw)
    for key, value in overrides:
        set_path(tree, key, value)
    recipe = build(Recipe, tree, "")
    check_values(recipe)
    for key, values in recipe.sweep.items():
        if not isinstance(values, list) or not values:
            raise SoupError(f"sweep.{key}: expected a non-empty list of values, got {values!r}")
        if key.split(".")[0] in search.SECTIONS:
            raise SoupError(f"sweep.{key}: a sweep cannot sweep itself or the search")
        other = search.nested_key(key, recipe.sweep)
        if other is not None:
            raise search.nesting_error(f"sweep.{key}", f"sweep.{other}")
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
        search.check(s.space, s.draws, s.seed, recipe.sweep, lambda settings: _check_settings(tree, settings),
                     "search.max_trials" if s.max_trials else "search.trials")
    for index, (combo, drawn) in enumerate(_combinations(recipe)):
        ingredient_id(index, {**combo, **drawn})  # a folder name too long: refused now, not when training
    return recipe


# The data keys a recipe may leave to its model: (backbone, model.kwargs) -> ({key: value}, where from).
MODEL_DATA_KEYS = ("image_size", "mean", "std")
ModelData = Callable[[str, dict], tuple[dict, str]]


def load_recipe(path: str | Path, overrides: list[str] | list[tuple[str, Any]] = (),
                model_data: ModelData | None = None) -> Recipe:
    return read_recipe(path, overrides, model_data)[0]


def read_recipe(path: str | Path, overrides: list[str] | list[tuple[str, Any]] = (),
                model_data: ModelData | None = None) -> tuple[Recipe, str]:
    """(the recipe, a line saying which data keys it took from its model, or ""). With `model_data`,
    data.image_size, mean and std that neither the file nor an override sets are the model's own, where
    it starts from pretrained weights (model.pretrained or model.weights)."""
    path = Path(path)
    raw = read_recipe_file(path)
    raw = raw if raw is not None else {}
    parsed = [parse_override(o) if isinstance(o, str) else o for o in overrides]
    try:
        raw, said = _model_data(raw, parsed, model_data) if model_data is not None else (raw, "")
        return recipe_from_dict(raw, parsed), said
    except SoupError as err:
        raise SoupError(f"recipe {path}: {err}") from None


def _model_data(raw: dict, overrides: list[tuple[str, Any]], model_data: ModelData) -> tuple[dict, str]:
    """`raw` with the data keys it leaves out set to the model's values, and the line saying so. A recipe
    too broken to tell is returned as it is: recipe_from_dict names what is wrong."""
    tree = copy.deepcopy(raw)
    for key, value in overrides:
        set_path(tree, key, value)
    data, model = tree.get("data"), tree.get("model")
    if not isinstance(data, dict) or not isinstance(model, dict) or not isinstance(model.get("backbone"), str):
        return raw, ""
    missing = [key for key in MODEL_DATA_KEYS if key not in data]
    # The values belong to the pretrained weights: a model initialised at random has none of its own.
    if not missing or (model.get("pretrained", True) is not True and not model.get("weights")):
        return raw, ""
    values, source = model_data(model["backbone"], model.get("kwargs") or {})
    taken = {key: values[key] for key in missing if key in values}
    if not taken:
        return raw, ""
    filled = copy.deepcopy(raw)
    if not isinstance(filled.get("data", {}), dict):
        return raw, ""
    filled["data"] = {**filled.get("data", {}), **taken}
    shown = ", ".join(f"{key} {value}" for key, value in taken.items())
    return filled, f"data: {shown} from {source} (the recipe leaves {'them' if len(taken) > 1 else 'it'} out)"


@dataclass
class Ingredient:
    index: int
    id: str
    recipe: Recipe
    settings: dict  # every value set for this ingredient: its grid values, then its drawn ones
    sweep_ids: list[str] = field(default_factory=list)  # every ingredient of its sweep, itself included
    drawn: dict = field(default_factory=dict)  # the values the random search drew for it (sorted keys)
    prune: Optional[PruneConfig] = None  # the search's pruning: the resolved recipe holds no search


NAME_MAX = 255  # bytes in a file name (most file systems): an id is a folder under <out>/<name>/
PART_MAX = 40  # bytes an id part is cut to, hash included, when the whole id would not fit NAME_MAX
# Ids name each set value; long key names are shortened so that a search's ids stay readable in a table.
SHORT_KEYS = {"label_smoothing": "ls", "weight_decay": "wd", "augment": "aug", "optimizer": "opt",
              "warmup_epochs": "warmup", "layer_decay": "ld", "grad_clip": "clip", "drop_path_rate": "dpr",
              "momentum": "mom", "schedule": "sched", "lr_drop_epoch": "drop", "lr_drop_factor": "dropx"}


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)


def _part(key: str, value: Any) -> str:
    name = key.split(".")[-1]
    return f"{SHORT_KEYS.get(name, name)}{_slug(value)}"


def _cut(part: str) -> str:
    """`part` cut to PART_MAX bytes, ending in a hash of the whole, so that long values stay told apart."""
    head = part.encode()[:PART_MAX - 9].decode(errors="ignore")
    return f"{head}~{hashlib.sha256(part.encode()).hexdigest()[:8]}"


def ingredient_id(index: int, settings: dict) -> str:
    """`NN-<part>-<part>...`, one part per set value. An id is a folder name: one too long for it has its
    long parts cut (an id that fits never changes: checkpoints and --resume find ingredients by it), and
    one still too long is refused, naming the keys with the longest parts."""
    parts = {key: _part(key, value) for key, value in settings.items()}
    text = "-".join([f"{index:02d}", *parts.values()])
    if len(text.encode()) > NAME_MAX:
        parts = {key: part if len(part.encode()) <= PART_MAX else _cut(part) for key, part in parts.items()}
        text = "-".join([f"{index:02d}", *parts.values()])
    if len(text.encode()) > NAME_MAX:
        longest = sorted(parts, key=lambda key: len(parts[key].encode()), reverse=True)[:3]
        raise SoupError(f"ingredient {index}: its id (a folder name) would be {len(text.encode())} bytes, more than "
                        f"the {NAME_MAX} a file name may have, even with long values cut; longest parts from "
                        f"{', '.join(longest)}; sweep or search fewer keys")
    return text


def _combinations(recipe: Recipe) -> list[tuple[dict, dict]]:
    """(grid values, drawn values) of each ingredient, in index order: every combination of the sweep's
    values (in the order the sweep lists them), times every trial of the search when there is one
    (trial-major, so that raising search.trials appends ingredients and keeps the ids of those there)."""
    keys = list(recipe.sweep)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(recipe.sweep[k] for k in keys))]
    s = recipe.search
    trials = search.draw_trials(s.space, s.draws, s.seed) if s is not None else [{}]
    return [(combo, drawn) for drawn, combo in itertools.product(trials, grid)]


def finished_wanted(recipe: Recipe) -> int:
    """How many finished ingredients the recipe asks for: every grid combination times search.trials."""
    return math.prod(len(values) for values in recipe.sweep.values()) * (recipe.search.trials if recipe.search else 1)


def expand_sweep(recipe: Recipe) -> list[Ingredient]:
    """One resolved recipe per ingredient (see `_combinations` for their order)."""
    base = recipe.to_dict()
    base["sweep"], base["search"] = {}, None
    ingredients = []
    for index, (combo, drawn) in enumerate(_combinations(recipe)):
        settings = {**combo, **drawn}
        try:
            resolved = recipe_from_dict(base, list(settings.items()))
        except SoupError as err:  # values valid one by one, not together (e.g. train.min_lr > train.lr)
            raise SoupError(f"ingredient {index} ({search.describe(settings)}): {err}") from None
        ingredients.append(Ingredient(index, ingredient_id(index, settings), resolved, settings, drawn=drawn,
                                      prune=recipe.search and recipe.search.prune))
    # The sweep a user asked for: with pruning, draws past the first `trials` replace pruned ones.
    ids = [item.id for item in ingredients[:finished_wanted(recipe)]]
    for item in ingredients:
        item.sweep_ids = ids
    return ingredients
