"""Cooking: weight-space averages ("soups") of compatible ingredients (Wortsman et al., ICML 2022).

Each method is one function registered in METHODS under its name; it takes the ingredients and a
`Selector` (None when cooking without data) and returns a `Soup`. Tensors are streamed from the
safetensors files one at a time, so memory stays near one model however many ingredients there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from safetensors import safe_open

from soup.backbones import model_from_checkpoint
from soup.checkpoint import Checkpoint, save_checkpoint
from soup.data import load_split
from soup.errors import SoupError
from soup.evaluate import evaluate, make_loader, resolve_device
from soup.recipe import recipe_from_dict


@dataclass
class Soup:
    state_dict: dict[str, torch.Tensor]
    members: list[tuple[Checkpoint, float]]  # (ingredient, weight); weights sum to one
    steps: list[dict] = field(default_factory=list)  # what the method tried, in order


@dataclass
class SoupMethod:
    fn: Callable
    needs_selection: bool


METHODS: dict[str, SoupMethod] = {}


def soup_method(name: str, needs_selection: bool = False):
    def register(fn):
        METHODS[name] = SoupMethod(fn, needs_selection)
        return fn
    return register


class Selector:
    """Scores weights on the held-out set that selects the soup (one model and one loader, reused)."""

    def __init__(self, template: Checkpoint, split: str = "val", root: str | Path | None = None,
                 device: torch.device | None = None, batch_size: int = 128, num_workers: int = 0):
        self.split = split
        self.device = device or resolve_device()
        data_cfg = recipe_from_dict(template.recipe).data
        self.root = str(root if root is not None else data_cfg.root)
        dataset = load_split(data_cfg, split, root=self.root, classes=template.classes)
        self.loader = make_loader(dataset, batch_size, num_workers, self.device)
        self.model = model_from_checkpoint(template).to(self.device)

    def __call__(self, state_dict: dict[str, torch.Tensor]) -> dict:
        self.model.load_state_dict(state_dict)
        return evaluate(self.model, self.loader, self.device)


def weighted_average(members: list[tuple[Checkpoint, float]]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·θᵢ over floating tensors, accumulated in fp32 and read one tensor at a time; integer buffers
    (BatchNorm's num_batches_tracked) are copied from the first member, never averaged into floats."""
    total: dict[str, torch.Tensor] = {}
    for index, (checkpoint, weight) in enumerate(members):
        with safe_open(str(checkpoint.path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point():
                    if index == 0:
                        total[key] = tensor
                elif index == 0:
                    total[key] = tensor.float().mul_(weight)
                else:
                    total[key].add_(tensor.float(), alpha=weight)
    return total


@soup_method("uniform")
def uniform_soup(ingredients: list[Checkpoint], select: Selector | None, console: Console) -> Soup:
    weight = 1.0 / len(ingredients)
    members = [(c, weight) for c in ingredients]
    return Soup(weighted_average(members), members)


@soup_method("greedy", needs_selection=True)
def greedy_soup(ingredients: list[Checkpoint], select: Selector, console: Console) -> Soup:
    """The paper's recipe: rank ingredients by held-out accuracy, start from the best, and add each next
    one if the average with it does not lower held-out accuracy."""
    scored = []
    for checkpoint in ingredients:
        result = select(checkpoint.state_dict())
        console.print(f"  {checkpoint.name}: {result['top1']:.2%} on {select.split}")
        scored.append((result["top1"], checkpoint))
    scored.sort(key=lambda item: -item[0])  # stable: ties keep the order given
    best_acc, best = scored[0]
    kept = [best]
    steps = [{"candidate": best.name, "top1": best_acc, "kept": True}]
    console.print(f"  greedy: start from {best.name} ({best_acc:.2%})")
    for _, candidate in scored[1:]:
        trial = weighted_average([(c, 1.0 / (len(kept) + 1)) for c in kept + [candidate]])
        acc = select(trial)["top1"]
        keep = acc >= best_acc
        steps.append({"candidate": candidate.name, "top1": acc, "kept": keep})
        verdict = "[green]kept[/]" if keep else "[red]left out[/]"
        console.print(f"  greedy: + {candidate.name} -> {acc:.2%} on {select.split}: {verdict}")
        if keep:
            kept.append(candidate)
            best_acc = acc
    members = [(c, 1.0 / len(kept)) for c in kept]
    return Soup(weighted_average(members), members, steps)


def first_difference(a: Checkpoint, b: Checkpoint) -> tuple[str, bool] | None:
    """The first reason `a` and `b` cannot be averaged, and whether --force may override it."""
    if a.classes != b.classes:
        if sorted(a.classes) == sorted(b.classes):
            return "same classes in a different order", False
        return f"different class lists ({len(a.classes)} vs {len(b.classes)} classes)", False
    if a.backbone != b.backbone:
        return f"different backbones ({a.backbone} vs {b.backbone})", False
    layout_a, layout_b = a.tensor_layout(), b.tensor_layout()
    if layout_a.keys() != layout_b.keys():
        only = sorted(layout_a.keys() ^ layout_b.keys())
        return f"different tensor names (e.g. {only[0]})", False
    for key in layout_a:
        if layout_a[key] != layout_b[key]:
            (sa, da), (sb, db) = layout_a[key], layout_b[key]
            what = "shape" if sa != sb else "dtype"
            return f"tensor {key} differs in {what} ({sa} {da} vs {sb} {db})", False
    if a.fingerprint != b.fingerprint:
        return (f"different starting weights (fingerprint {a.fingerprint} vs {b.fingerprint}); soups need a "
                "shared pretrained start"), True
    return None


def check_finite(ingredients: list[Checkpoint]) -> None:
    """A NaN or infinity in one ingredient would poison the whole average: refuse it by name."""
    for checkpoint in ingredients:
        with safe_open(str(checkpoint.path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise SoupError(f"{checkpoint.path}: tensor {key} holds NaN or infinite values; retrain "
                                    "this ingredient (lower lr) or leave it out of the soup")


def check_compatible(ingredients: list[Checkpoint], force: bool, console: Console) -> None:
    reference = ingredients[0]
    for other in ingredients[1:]:
        difference = first_difference(reference, other)
        if difference is None:
            continue
        reason, forceable = difference
        if forceable and force:
            console.print(f"[yellow]warning[/]: {other.path} vs {reference.path}: {reason}; averaging anyway "
                          "(--force): expect a poor soup")
            continue
        hint = "; --force averages them anyway" if forceable else ""
        raise SoupError(f"cannot soup {reference.path} with {other.path}: {reason}{hint}")


def cook(method: str, ingredients: list[Checkpoint], out: str | Path, select_on: str | None = "val",
         data_root: str | Path | None = None, force: bool = False, console: Console | None = None,
         device: torch.device | None = None) -> Path:
    """Cook one soup with `method` and write it as a normal checkpoint with its provenance."""
    console = console or Console()
    if method not in METHODS:
        raise SoupError(f"unknown soup method {method!r}; choose from {', '.join(METHODS)}")
    if not ingredients:
        raise SoupError("no ingredients to cook; train some with `soup train RECIPE` or name checkpoints")
    for checkpoint in ingredients:
        if checkpoint.kind != "ingredient":
            raise SoupError(f"{checkpoint.path} is a {checkpoint.kind} soup, not an ingredient; cook from "
                            "the ingredients themselves")
    names = [c.name for c in ingredients]
    if len({c.path.resolve() for c in ingredients}) != len(ingredients):
        raise SoupError("the same ingredient is listed twice; a soup counts each ingredient once")
    check_compatible(ingredients, force, console)
    check_finite(ingredients)
    spec = METHODS[method]
    if spec.needs_selection and select_on is None:
        raise SoupError(f"the {method} soup needs held-out data; --no-eval works with --uniform only")
    select = Selector(ingredients[0], select_on, data_root, device) if select_on else None
    console.print(f"[bold]{method} soup[/] of {len(ingredients)} ingredients" +
                  (f", selected on {select_on}" if select else ", without data"))
    soup = spec.fn(ingredients, select, console)
    selection = None
    if select is not None:
        result = select(soup.state_dict)
        selection = {"split": select_on, "root": select.root, **result}
        console.print(f"  {method} soup: {result['top1']:.2%} on {select_on} (the selection set) with "
                      f"{len(soup.members)} of {len(ingredients)} ingredients")
    reference = ingredients[0]
    meta = {
        "kind": method,
        "name": method,
        "recipe": reference.recipe,
        "backbone": reference.backbone,
        "classes": reference.classes,
        "start_fingerprint": reference.fingerprint,
        "members": [{"name": c.name, "path": str(c.path), "weight": w} for c, w in soup.members],
        "candidates": names,
        "steps": soup.steps,
        "selection": selection,
    }
    path = save_checkpoint(out, soup.state_dict, meta)
    console.print(f"  wrote {path}")
    return path
