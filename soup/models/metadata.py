"""A checkpoint's metadata checked once, where it is read: every field soup's commands use has the shape
they use it in, or the file is refused in one line naming the field (report, plot, inspect, eval and
export then never meet an edited value they would trip over). A recorded recipe is data: it may not name a
file for a model library to load (timm's `checkpoint_path`, a pretrained config's `file`), since loading
one unpickles it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from soup.errors import SoupError
from soup.recipe.checks import normalisation_checks

# model.kwargs keys, and keys inside their values, through which timm (or a hub entry) opens a file or a
# download of the metadata's choosing; soup's own model.weights reads tensors only and never comes from here.
FILE_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
FILE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict")

Check = Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_number(v) for v in value)


def _number_map(value: Any) -> bool:
    return isinstance(value, dict) and all(_number(v) for v in value.values())


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(_text(v) for v in value)


def _mapping(value: Any) -> bool:
    return isinstance(value, dict)


def _flag(value: Any) -> bool:
    return isinstance(value, bool)


WANTED = {_number: "a number", _integer: "a whole number", _text: "a text", _numbers: "a list of numbers",
          _number_map: "a number for each tensor", _texts: "a list of texts", _mapping: "an object",
          _flag: "true or false"}


# What each known field holds where present (older files lack some); a record's own fields below.
TOP = {"kind": _text, "name": _text, "id": _text, "seed": _integer, "val_acc": _number, "raw_val_acc": _number,
       "sweep_ids": _texts, "candidates": _texts, "start_weight": _number, "data_root": _text, "run": _mapping,
       "settings": _mapping, "versus_best": _mapping, "interpolation": _mapping, "guided": _mapping}
RECORDS: dict[str, tuple[dict[str, Check], tuple[str, ...]]] = {
    # field: (its keys' checks, the keys it must have)
    "probe": ({"id": _text, "val_acc": _number}, ()),
    "selection": ({"split": _text, "top1": _number, "top5": _number, "loss": _number}, ("split", "top1")),
    "stock": ({"mean_ratio": _number, "ratios": _number_map, "cosines": _number_map}, ("mean_ratio",)),
    "best": ({"winner": _text}, ("winner",)),
    "topk": ({"k": _integer}, ("k",)),
}  # calibration: soup.score.calibrate.temperature_of checks it, against the bounds fitting keeps to
MEMBER = ({"name": _text, "path": _text, "weight": _number}, ("name", "weight"))
# A step of the greedy family, of top-k, of an interpolation or of a learned soup: told apart by the key
# each one alone has (the order soup inspect tells them apart in).
STEP_KEYS = {"candidate": _text, "kept": _flag, "top1": _number, "k": _integer, "added": _text, "alpha": _number,
             "epoch": _integer, "loss": _number, "coefficients": _numbers, "gain": _mapping}
STEP_FORMS = (("candidate", ("top1", "kept")), ("k", ("added", "top1")), ("alpha", ("top1",)),
              ("epoch", ("loss", "coefficients")))


class _Refusal(Exception):
    """An offending field's path (e.g. `val_history[2].val_top1`) and what it should hold."""


def _record(value: Any, where: str, checks: dict[str, Check], required: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise _Refusal(where, "an object")
    for key in required:
        if key not in value:
            raise _Refusal(f"{where}.{key}", "a value (it is missing)")
    for key, check in checks.items():
        if key in value and not check(value[key]):
            raise _Refusal(f"{where}.{key}", WANTED[check])


def _listed(value: Any, where: str, each: Callable[[Any, str], None]) -> None:
    if not isinstance(value, list):
        raise _Refusal(where, "a list")
    for index, item in enumerate(value):
        each(item, f"{where}[{index}]")


# A search.prune decision an epoch's record holds (soup.train.prune): what was compared, and the verdict.
RUNG = ({"epoch": _integer, "val_top1": _number, "rule": _text, "pruned": _flag}, ("pruned",))


def _history_entry(entry: Any, where: str) -> None:
    _record(entry, where, {}, ("val_top1",))
    for key, value in entry.items():
        if key == "rung":
            _record(value, f"{where}.rung", *RUNG)
            for optional in ("threshold", "peers"):
                if value.get(optional) is not None and not _number(value[optional]):
                    raise _Refusal(f"{where}.rung.{optional}", "a number")
        elif not (_number(value) or value is None):
            raise _Refusal(f"{where}.{key}", "a number")


def _step(step: Any, where: str) -> None:
    _record(step, where, STEP_KEYS, ())
    for marker, required in STEP_FORMS:
        if marker in step:
            _record(step, where, {}, required)
            return


def _kwargs_file(kwargs: Any, where: str) -> str | None:
    """The first place in recorded model.kwargs that names a file or download to load, else None."""
    if isinstance(kwargs, dict):
        for key, value in kwargs.items():
            if key in FILE_KWARGS or key in FILE_KEYS:
                return f"{where}.{key}"
            found = _kwargs_file(value, f"{where}.{key}")
            if found:
                return found
    elif isinstance(kwargs, list):
        return next((found for i, v in enumerate(kwargs) if (found := _kwargs_file(v, f"{where}[{i}]"))), None)
    return None


def _recipe(path: Path, meta: dict) -> None:
    recipe = meta["recipe"]
    model, data = recipe.get("model", {}), recipe.get("data", {})
    if not isinstance(model, dict) or not isinstance(data, dict):
        raise _Refusal("recipe.model" if not isinstance(model, dict) else "recipe.data", "an object")
    if "backbone" in model and model["backbone"] != meta["backbone"]:
        raise _Refusal("recipe.model.backbone", f"the recorded backbone {meta['backbone']}")
    if "kwargs" in model and not isinstance(model["kwargs"], dict):
        raise _Refusal("recipe.model.kwargs", "an object")
    named = _kwargs_file(model.get("kwargs"), "recipe.model.kwargs")
    if named:
        raise SoupError(f"{path}: soup metadata field {named} names a file for the model library to load, "
                        "which a checkpoint may never choose (loading it would unpickle it); the file was "
                        "edited: re-create it with `soup train`")
    if "root" in data and not _text(data["root"]):
        raise _Refusal("recipe.data.root", "a path")
    mean, std = data.get("mean", [0.5]), data.get("std", [0.5])  # what is not recorded, the recipe's default
    if not _numbers(mean) or not _numbers(std):
        raise _Refusal("recipe.data.mean" if not _numbers(mean) else "recipe.data.std", "a list of numbers")
    for ok, key, why in normalisation_checks(mean, std):  # the recipe check's own: an edited value is refused
        if not ok:
            raise _Refusal(f"recipe.{key}", why.removeprefix("must be "))


def check_metadata(path: Path, meta: dict, head_rows: int | None) -> None:
    """Refuse `meta` (already known to be an object with the required top-level fields) in one line naming
    the file and the first field whose value soup cannot use. `head_rows`: the rows of the file's head.weight
    tensor (None: it has none), which must be one per recorded class."""
    try:
        for key, check in TOP.items():  # null: not recorded (an imported ingredient has no training seed)
            if meta.get(key) is not None and not check(meta[key]):
                raise _Refusal(key, WANTED[check])
        for key, (checks, required) in RECORDS.items():
            if meta.get(key) is not None:
                _record(meta[key], key, checks, required)
        if "val_history" in meta:
            _listed(meta["val_history"], "val_history", _history_entry)
        if "members" in meta:
            _listed(meta["members"], "members", lambda m, where: _record(m, where, *MEMBER))
        if "steps" in meta:
            _listed(meta["steps"], "steps", _step)
        _recipe(path, meta)
        if head_rows is not None and head_rows != len(meta["classes"]):
            raise _Refusal("classes", f"one name per row of the head ({head_rows}, not {len(meta['classes'])})")
    except _Refusal as refusal:
        field, wanted = refusal.args
        raise SoupError(f"{path}: soup metadata field {field} does not hold {wanted}; the file was edited or "
                        "damaged: re-create it with `soup train` or `soup cook`") from None
