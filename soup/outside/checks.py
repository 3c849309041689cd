"""What a source may choose, checked before anything it names is built, opened or written: the model kwargs
it records (plain architecture settings only), and every tensor it holds (a real, finite value of the kind
the model keeps there, and BatchNorm variances that are variances).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from soup.errors import SoupError
from soup.text import printable

# Model kwargs a source records reach timm.create_model (or a hub entry) as they are, and timm opens files
# and downloads through several of them (checkpoint_path, pretrained_cfg and its overlay's file, url,
# hf_hub_id or state_dict, cache_dir), with new ones in later releases. A list of those names would be one
# release behind, so a source's kwargs are checked against what they may be instead: architecture settings
# (depth, width, image size, pooling, activation by name) under a plain name, each a number, true/false, a
# short name or a short list of those. A path, a URL, a nested setting or a name about loading is refused.
KWARG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
PLAIN_TEXT = re.compile(r"[A-Za-z0-9_-]{0,64}")  # no '/', '.', ':' or '~': no path, file name or URL
MAX_LIST = 16
# Words of a kwarg's name (between underscores) that choose what is loaded or from where, whatever its
# value: `checkpoint_path: model` names a file in the current folder as much as `/tmp/model.pth` does. A
# name ending in `path` too (`drop_path_rate` is a rate, `model_path` a file).
LOADING_WORDS = {"file", "filename", "files", "dir", "url", "hub", "cfg", "checkpoint", "pretrained", "weights",
                 "cache", "load", "repo", "dict", "folder"}
PLAIN_KWARGS = ("numbers, true/false, short names of letters, digits, '-' and '_', or short lists of them")


def _plain_value(value) -> bool:
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and PLAIN_TEXT.fullmatch(value) is not None


def _kwarg_problem(key, value) -> str | None:
    """Why a source may not record `key: value` (None: it may)."""
    if not isinstance(key, str) or not KWARG_NAME.fullmatch(key):
        return "is not a plain setting name"
    words = key.lower().split("_")
    if LOADING_WORDS.intersection(words) or words[-1] in ("path", "paths"):
        return "chooses what the model loads or where from"
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST or not all(_plain_value(v) for v in value):
            return f"is not a list of at most {MAX_LIST} plain values"
        return None
    if isinstance(value, dict):
        return "is a nested setting (it could name a file or a download)"
    if not _plain_value(value):
        return "is not a plain value (it could name a file or a URL)"
    return None


def check_model_kwargs(where: str, kwargs: dict) -> None:
    """Refuse, in one line naming `where` (the source) and the key, model kwargs a source may not record
    (see LOADING_WORDS and PLAIN_TEXT); checked before the model is built, so nothing they name is opened."""
    for key, value in kwargs.items():
        problem = _kwarg_problem(key, value)
        if problem is not None:
            shown_value = printable(repr(value))
            shown_value = shown_value if len(shown_value) <= 60 else shown_value[:57] + "..."
            raise SoupError(f"{where}: refused: its recorded model kwarg {printable(key)} ({shown_value}) {problem}; "
                            f"a source may record architecture settings only ({PLAIN_KWARGS}), never a file, a "
                            "download or how to load: remove it from the source, or name its weights file "
                            "alone (a Hub folder's model.safetensors, a state dict) with --model")


def _tensor_problem(key: str, tensor: torch.Tensor, wanted: torch.dtype) -> str | None:
    """Why `tensor` cannot stand where the model has a tensor of dtype `wanted` (None: it can)."""
    if tensor.layout != torch.strided:
        return f"is a {str(tensor.layout).replace('torch.', '')} tensor, not a dense one"
    if tensor.device.type == "meta":
        return "is on the meta device: it holds no values (saved from a model that was never materialised)"
    if tensor.is_complex() or tensor.is_floating_point() != wanted.is_floating_point:
        return f"holds {str(tensor.dtype).replace('torch.', '')} values where the model keeps " \
               f"{str(wanted).replace('torch.', '')}"
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        return "holds NaN or infinite values (its training diverged, or the file was damaged)"
    if key.endswith("running_var") and (tensor < 0).any():
        return "holds negative BatchNorm variances (a variance is never below 0: the file was edited or damaged)"
    return None


def checked_tensors(where: str, state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype],
                    named: Callable[[str], str] = str) -> dict:
    """`state` (soup's names, fitted to the model whose dtypes are `dtypes`), every tensor checked (see
    `_tensor_problem`) and named in a refusal as `named` gives its name in the source, each with storage of
    its own: torch.save keeps views of one storage as views, which safetensors refuses to write, so a tensor
    that shares its storage with another is cloned."""
    for key, tensor in state.items():
        problem = _tensor_problem(key, tensor, dtypes[key])
        if problem is not None:
            raise SoupError(f"{where}: refused: tensor {printable(named(key))} {problem}; nothing was written")
    seen: dict[int, int] = {}
    for tensor in state.values():
        pointer = tensor.untyped_storage().data_ptr()
        seen[pointer] = seen.get(pointer, 0) + 1
    return {k: v.detach().clone() if seen[v.untyped_storage().data_ptr()] > 1 else v for k, v in state.items()}
