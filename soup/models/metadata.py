"""A checkpoint's metadata checked once, where it is read (by soup.models.records, which alone calls it): every
field soup's commands use has the shape they use it in, or the file is refused in one line naming the field
(report, plot, inspect, eval and export then never meet an edited value they would trip over). A recorded
recipe is data: it may not name a file for a model library to load (timm's `checkpoint_path`, a pretrained
config's `file`), since loading one unpickles it.
"""

from __future__ import annotations

from collections import Counter
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
       "sweep_ids": _texts, "candidates": _texts, "data_root": _text, "run": _mapping, "settings": _mapping,
       "start": _mapping}
# A search.prune decision an epoch's record holds (soup.train.prune): what was compared, and the verdict.
RUNG = ({"epoch": _integer, "val_top1": _number, "rule": _text, "pruned": _flag},
        ("epoch", "val_top1", "rule", "pruned"))
RECORDS: dict[str, tuple[dict[str, Check], tuple[str, ...]]] = {
    # field: (its keys' checks, the keys it must have)
    "probe": ({"id": _text, "val_acc": _number}, ()),
    "selection": ({"split": _text, "top1": _number, "top5": _number, "loss": _number}, ("split", "top1")),
    "bn_reset": ({"off": _flag, "layers": _texts, "of_layers": _integer, "images": _integer, "split": _text,
                  "seed": _integer, "batch_size": _integer}, ()),
    "imported": ({"source": _text, "file": _text, "hub_id": _text}, ()),
    "versus_best": ({"split": _text, "ref": _text, "diff": _number}, ()),
    # its temperature: checked where it is used, against the bounds fitting keeps to (soup.models.records)
    "calibration": ({"split": _text, "images": _integer, "nll_before": _number, "nll_after": _number,
                     "ece_before": _number, "ece_after": _number}, ()),
}
# A soup method's own fields (its record beside the steps), declared where the method is (soup.cook):
# field -> (its keys' checks, the keys it must have), or a check of the whole value.
METHOD_FIELDS: dict[str, tuple[dict[str, Check], tuple[str, ...]] | Check] = {}
MEMBER = ({"name": _text, "path": _text, "weight": _number}, ("name", "weight"))
# The forms of a soup method's step, told apart by the key each one alone has (in this order); any
# method's steps take one of these forms, so that `soup inspect` and the plots can tell them.
STEP_KEYS = {"candidate": _text, "kept": _flag, "top1": _number, "k": _integer, "added": _text, "alpha": _number,
             "epoch": _integer, "loss": _number, "coefficients": _numbers, "gain": _mapping}
STEP_FORMS = (("candidate", ("top1", "kept")), ("k", ("added", "top1")), ("alpha", ("top1",)),
              ("epoch", ("loss", "coefficients")))
# The checks a method's own fields are declared with (soup.cook names them here).
NUMBER, INTEGER, TEXT, NUMBERS, NUMBER_MAP, TEXTS, MAPPING, FLAG = (_number, _integer, _text, _numbers, _number_map,
                                                                    _texts, _mapping, _flag)


def declare_method_field(key: str, checks: dict[str, Check] | Check, required: tuple[str, ...] = ()) -> None:
    """A soup method's own metadata field `key`: an object whose keys pass `checks` (and has `required`),
    or a value passing the one check given; checked at read like every other field."""
    METHOD_FIELDS[key] = (checks, required) if isinstance(checks, dict) else checks


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


def _rung(value: Any, where: str) -> None:
    _record(value, where, *RUNG)
    for optional in ("threshold", "peers"):
        if value.get(optional) is not None and not _number(value[optional]):
            raise _Refusal(f"{where}.{optional}", "a number")
    if value["pruned"] and value.get("threshold") is None:
        raise _Refusal(f"{where}.threshold", "a number (the draw was pruned against it)")


def _history_entry(entry: Any, where: str) -> None:
    _record(entry, where, {}, ("val_top1",))
    for key, value in entry.items():
        if key == "rung":
            _rung(value, f"{where}.rung")
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


def _method_fields(meta: dict) -> None:
    for key, declared in METHOD_FIELDS.items():
        if meta.get(key) is None:
            continue
        if isinstance(declared, tuple):
            _record(meta[key], key, *declared)
        elif not declared(meta[key]):
            raise _Refusal(key, WANTED[declared])


def _required(path: Path, meta: dict) -> None:
    """The fields every soup checkpoint has, of the types every command relies on."""
    missing = [k for k in ("classes", "backbone", "start_fingerprint", "recipe") if k not in meta]
    if missing:
        raise SoupError(f"{path}: soup metadata lacks {', '.join(missing)}; the file is damaged")
    types = {"classes": list, "backbone": str, "start_fingerprint": str, "recipe": dict, "kind": str}
    wrong = [k for k, kind in types.items() if k in meta and not isinstance(meta[k], kind)]
    if wrong or not all(isinstance(c, str) for c in meta["classes"]):
        raise SoupError(f"{path}: soup metadata has a wrong type in {', '.join(wrong) or 'classes'}; the file "
                        "is damaged")
    twice = next((name for name, count in Counter(meta["classes"]).items() if count > 1), None)
    if twice is not None:  # the class folders could never match it: it is the metadata that is wrong
        raise SoupError(f"{path}: soup metadata's classes name {twice!r} twice; the file's metadata was edited "
                        "or damaged")


def check_metadata(path: Path, meta: dict, head_rows: int | None) -> None:
    """Refuse `meta` (a JSON object) in one line naming the file and the first field whose value soup
    cannot use. `head_rows`: the rows of the file's head.weight tensor (None: it has none), which must be
    one per recorded class."""
    _required(path, meta)
    try:
        for key, check in TOP.items():  # null: not recorded (an imported ingredient has no training seed)
            if meta.get(key) is not None and not check(meta[key]):
                raise _Refusal(key, WANTED[check])
        for key, (checks, required) in RECORDS.items():
            if meta.get(key) is not None:
                _record(meta[key], key, checks, required)
        if meta.get("pruned") is not None:
            _rung(meta["pruned"], "pruned")
        _method_fields(meta)
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
