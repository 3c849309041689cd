"""Fitting a source's tensors to soup's model: its key layout found and mapped to soup's, then every name
and shape checked.

Two layouts are known: soup's own (`backbone.*` + `head.weight`/`head.bias`, what `soup train` saves and
a module wrapping soup's Classifier holds) and timm's (the model's own names, its classifier under
whatever the architecture calls it: fc, head, classifier, head.fc). Either may sit under a prefix: a
Lightning module's attribute (`model.`), DDP's `module.`; the prefix is found by trying each one the keys
share, or given (--strip-prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch

from soup.errors import SoupError
from soup.recipe.spec import parse_backbone
from soup.text import printable


@dataclass
class Fitted:
    """A source's tensors under soup's names, and how they were found."""

    state: dict[str, torch.Tensor]
    layout: str  # "soup" or "timm"
    prefix: str  # stripped from every key ("" for none)
    left_out: list[str]  # keys outside the prefix (e.g. a Lightning module's loss weights), not imported


def timm_classifier(backbone: str, kwargs: dict, num_classes: int) -> str | None:
    """The name timm's model gives its classifier (None for a torch.hub backbone: soup's layout only)."""
    kind, _, entry = parse_backbone(backbone)
    if kind != "timm":
        return None
    with torch.device("meta"):  # names only: no memory, no initialisation
        model = timm.create_model(entry, pretrained=False, num_classes=max(num_classes, 1), **kwargs)
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)


def _prefixes(keys: list[str]) -> list[str]:
    """"" and every dotted beginning (one or two parts) some key has, most keys first."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                prefix = ".".join(parts[:depth]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    return [""] + sorted(counts, key=lambda p: -counts[p])


def _mapped(state: dict, layout: str, classifier: str | None) -> dict[str, torch.Tensor]:
    if layout == "soup":
        return dict(state)
    head = f"{classifier}."
    return {(f"head.{k[len(head):]}" if k.startswith(head) else f"backbone.{k}"): v for k, v in state.items()}


def _layouts(classifier: str | None) -> list[str]:
    return ["soup", "timm"] if classifier is not None else ["soup"]


def fit(state: dict[str, torch.Tensor], target: dict[str, torch.Size], classifier: str | None, where: str,
        model: str, strip: str | None = None, backbone_only: bool = False) -> Fitted:
    """`state` under soup's names, fitting `target` (soup's model: name -> shape) name for name and shape
    for shape, or one line naming the first misfit. `backbone_only`: a start, whose head is not used."""
    wanted = {k for k in target if not (backbone_only and k.startswith("head."))}
    if strip is not None:
        strip = strip if strip.endswith(".") or not strip else strip + "."
        if not any(k.startswith(strip) for k in state):
            raise SoupError(f"{where}: --strip-prefix {printable(strip)}: no tensor name begins with it (e.g. "
                            f"{printable(next(iter(state)))})")
    best = None
    for prefix in [strip] if strip is not None else _prefixes(list(state)):
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        for layout in _layouts(classifier):
            mapped = _mapped(inner, layout, classifier)
            if backbone_only:
                mapped = {k: v for k, v in mapped.items() if not k.startswith("head.")}
            missing, extra = sorted(wanted - mapped.keys()), sorted(mapped.keys() - wanted)
            if not missing and not extra:
                _check_shapes(mapped, target, where, model)
                return Fitted(mapped, layout, prefix, sorted(k for k in state if not k.startswith(prefix)))
            score = len(wanted & mapped.keys())
            if best is None or score > best[0]:
                best = (score, prefix, layout, missing, extra)
    _, prefix, layout, missing, extra = best
    under = f" under {printable(prefix)}" if prefix else ""
    raise SoupError(f"{where}: its tensors do not fit {model} (closest: {layout}'s names{under}; missing "
                    f"{[printable(k) for k in missing[:3]]}, unexpected {[printable(k) for k in extra[:3]]}); check "
                    "--model and its kwargs, or name the prefix to strip with --strip-prefix")


def _check_shapes(mapped: dict, target: dict, where: str, model: str) -> None:
    if "head.weight" in mapped and mapped["head.weight"].shape[0] != target["head.weight"][0]:
        raise SoupError(f"{where}: its head has {mapped['head.weight'].shape[0]} classes, the data root has "
                        f"{target['head.weight'][0]}; import it with the data root it was fine-tuned on (--data)")
    for key, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(target[key]):
            raise SoupError(f"{where}: tensor {printable(key)} is {tuple(tensor.shape)}, {model} has "
                            f"{tuple(target[key])}; check --model and its kwargs (size, depth, width)")


def source_key(fitted: Fitted, key: str, classifier: str | None) -> str:
    """The name soup's tensor `key` has in the source `fitted` came from (what its owner knows it by)."""
    if fitted.layout == "timm":
        key = f"{classifier}.{key[len('head.'):]}" if key.startswith("head.") else key[len("backbone."):]
    return fitted.prefix + key
