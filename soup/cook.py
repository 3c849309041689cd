"""Cooking: weight-space averages ("soups") of compatible ingredients (Wortsman et al., ICML 2022).

Each method is one function registered in METHODS under its name; it takes the ingredients, a
`Selector` (None when cooking without data), a console and a `Kitchen` (its options and, on demand, the
starting weights) and returns a `Soup`. Tensors are streamed from the
safetensors files one at a time, so memory stays near one model however many ingredients there are.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors import safe_open
from torch.func import functional_call
from torch.utils.data import DataLoader

from soup.backbones import build_model, fingerprint
from soup.calibrate import calibration_record, print_calibration
from soup.checkpoint import Checkpoint, save_checkpoint, tensors_across
from soup.errors import SoupError
from soup.evaluate import Evaluator, Predictions, predictions
from soup.metrics import scores
from soup.outputs import check_output
from soup.probe import probed_start
from soup.recipe import recipe_from_dict
from soup.report import describe_difference, difference, versus_best


@dataclass
class Soup:
    state_dict: dict[str, torch.Tensor]
    # (checkpoint, weight). The weights sum to one, except where a method mixes in the starting weights:
    # then `extra` records the start's share (interpolate) or the per-tensor ratios (stock).
    members: list[tuple[Checkpoint, float]]
    steps: list[dict] = field(default_factory=list)  # what the method tried, in order
    extra: dict = field(default_factory=dict)  # method-specific record, merged into the soup's metadata


@dataclass
class SoupMethod:
    fn: Callable
    needs_selection: bool
    takes_soups: bool = False  # may mix finished soups too (interpolate), not only ingredients
    options: dict = field(default_factory=dict)  # option name -> default; the CLI spells them --name


METHODS: dict[str, SoupMethod] = {}


def soup_method(name: str, needs_selection: bool = False, takes_soups: bool = False,
                options: dict | None = None):
    def register(fn):
        METHODS[name] = SoupMethod(fn, needs_selection, takes_soups, dict(options or {}))
        return fn
    return register


def starting_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights `checkpoint`'s ingredients started from, rebuilt from its recipe exactly as training
    built them (pretrained backbone or model.weights, head from init_seed), checked by fingerprint."""
    recipe = recipe_from_dict(checkpoint.recipe)
    model = build_model(recipe.model, checkpoint.classes, recipe.data.image_size, recorded_in=checkpoint.path)
    model = probed_start(model, recipe, checkpoint.path)
    rebuilt = fingerprint(model)
    if rebuilt != checkpoint.fingerprint:
        source = recipe.model.weights or recipe.model.backbone
        raise SoupError(f"{checkpoint.path}: the recipe's start ({source}) now rebuilds with fingerprint "
                        f"{rebuilt}, not the {checkpoint.fingerprint} its ingredients started from; restore "
                        "the original weights file (model.weights) or torch.hub/timm cache")
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone()
            for k, v in model.state_dict().items()}


@dataclass
class Kitchen:
    """What a method may use besides ingredients and selector: its options (defaults filled in) and the
    starting weights, rebuilt only when a method asks, since that may mean loading a pretrained model."""

    reference: Checkpoint
    options: dict = field(default_factory=dict)
    _start: dict | None = field(default=None, repr=False)

    def start(self) -> dict[str, torch.Tensor]:
        if self._start is None:
            self._start = starting_weights(self.reference)
        return self._start


def _kitchen(kitchen: Kitchen | None, ingredients: list[Checkpoint], method: str) -> Kitchen:
    kitchen = kitchen or Kitchen(ingredients[0])
    kitchen.options = {**METHODS[method].options, **kitchen.options}
    return kitchen


class Selector:
    """Scores weights on the held-out set that selects the soup: an Evaluator bound to one template, so
    the 2N-1 weight sets of a greedy soup share one model, one loader and the caches."""

    def __init__(self, template: Checkpoint, split: str = "val", root: str | Path | None = None,
                 device: torch.device | None = None, batch_size: int = 128, num_workers: int = 0,
                 use_cache: bool = True):
        self.template, self.split = template, split
        self.evaluator = Evaluator(split, root, device, batch_size, num_workers, use_cache)
        self.device = self.evaluator.device
        data = self.evaluator.data_for(template)
        self.root, self.loader = str(data.root), data.loader
        self.model, self.cached = self.evaluator.model_for(template)

    def __call__(self, state_dict: dict[str, torch.Tensor]) -> dict:
        return self.evaluator(self.template, state_dict)

    def logits(self, state_dict: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
        return self.evaluator.logits(self.template, state_dict)

    def judged(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, Predictions]:
        """The scores and the per-image predictions, so that two weight sets can be compared pairwise."""
        logits, targets = self.logits(state_dict)
        return scores(logits, targets), predictions(logits, targets, self.template.classes)


@contextlib.contextmanager
def _tensors(source: Checkpoint | dict):
    """(keys, get) for a checkpoint file (read lazily, one tensor at a time) or an in-memory state dict."""
    if isinstance(source, dict):
        yield list(source), source.__getitem__
    else:
        with safe_open(str(source.path), framework="pt") as f:
            yield list(f.keys()), f.get_tensor


def weighted_average(members: list[tuple[Checkpoint | dict, float]]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·θᵢ over floating tensors, accumulated in fp32 and read one tensor at a time; integer buffers
    (BatchNorm's num_batches_tracked) are copied from the first member, never averaged into floats.
    No member is modified."""
    total: dict[str, torch.Tensor] = {}
    for index, (source, weight) in enumerate(members):
        with _tensors(source) as (keys, get):
            for key in keys:
                tensor = get(key)
                # Copies: a member may be an in-memory state (the start) that later mixes still read.
                if not tensor.is_floating_point():
                    if index == 0:
                        total[key] = tensor.clone()
                elif index == 0:
                    total[key] = tensor.to(torch.float32, copy=True).mul_(weight)
                else:
                    total[key].add_(tensor.float(), alpha=weight)
    return total


@soup_method("uniform")
def uniform_soup(ingredients: list[Checkpoint], select: Selector | None, console: Console,
                 kitchen: Kitchen | None = None) -> Soup:
    """The mean of all ingredients."""
    weight = 1.0 / len(ingredients)
    members = [(c, weight) for c in ingredients]
    return Soup(weighted_average(members), members)


def _judged(select, state_dict: dict) -> tuple[dict, Predictions | None]:
    """Scores and per-image predictions; a bare scoring function (a stand-in selector) has no per-image
    predictions, and then no interval is given."""
    judged = getattr(select, "judged", None)
    return judged(state_dict) if judged else (select(state_dict), None)


@soup_method("greedy", needs_selection=True)
def greedy_soup(ingredients: list[Checkpoint], select: Selector, console: Console,
                kitchen: Kitchen | None = None) -> Soup:
    """The paper's recipe: rank ingredients by held-out accuracy, start from the best, and add each next
    one if the average with it does not lower held-out accuracy."""
    scored = []
    for checkpoint in ingredients:
        result, outcome = _judged(select, checkpoint.state_dict())
        console.print(f"  {checkpoint.name}: {result['top1']:.2%} on {select.split}")
        scored.append((result["top1"], checkpoint, outcome))
    scored.sort(key=lambda item: -item[0])  # stable: ties keep the order given
    best_acc, best, best_outcome = scored[0]
    kept = [best]
    steps = [{"candidate": best.name, "top1": best_acc, "kept": True}]
    console.print(f"  greedy: start from {best.name} ({best_acc:.2%})")
    for _, candidate, _ in scored[1:]:
        trial = weighted_average([(c, 1.0 / (len(kept) + 1)) for c in kept + [candidate]])
        result, outcome = _judged(select, trial)
        acc = result["top1"]
        keep = acc >= best_acc
        # The gain over the soup so far on the same images: an interval holding 0 means a tie within noise.
        gain = difference(outcome, best_outcome) if outcome is not None else None
        steps.append({"candidate": candidate.name, "top1": acc, "kept": keep, **({"gain": gain} if gain else {})})
        verdict = "[green]kept[/]" if keep else "[red]left out[/]"
        noise = " (a tie within noise)" if gain and gain["low"] is not None and gain["low"] <= 0 <= gain["high"] else ""
        said = f", gain {describe_difference(gain, p=False)}" if gain else ""
        console.print(f"  greedy: + {candidate.name} -> {acc:.2%} on {select.split}{said}: {verdict}{noise}")
        if keep:
            kept.append(candidate)
            best_acc, best_outcome = acc, outcome
    members = [(c, 1.0 / len(kept)) for c in kept]
    return Soup(weighted_average(members), members, steps)


def _mix_parameters(stacked: dict[str, torch.Tensor], coefficients: torch.Tensor,
                    buffers: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Σₖ cₖ·θₖ for each stacked tensor; `coefficients` is (ingredients, 1) or (ingredients, tensors).
    Buffers (BatchNorm statistics) are mixed alike but without gradient: they are not parameters."""
    per_tensor = coefficients.shape[1] > 1
    return {key: torch.tensordot((coefficients.detach() if key in buffers else coefficients)[
                :, j if per_tensor else 0], stack, dims=1)
            for j, (key, stack) in enumerate(stacked.items())}


@soup_method("learned", needs_selection=True,
             options={"per_layer": False, "epochs": 5, "lr": 0.05, "batch_size": 32})
def learned_soup(ingredients: list[Checkpoint], select: Selector, console: Console,
                 kitchen: Kitchen | None = None) -> Soup:
    """The paper's learned soup: softmax mixing coefficients per ingredient (or per ingredient and tensor,
    --per-layer), fitted by gradient descent on the held-out set."""
    options = _kitchen(kitchen, ingredients, "learned").options
    device = select.device
    shared, stacked, integers = {}, {}, {}
    for key, tensors in tensors_across(ingredients):
        if not tensors[0].is_floating_point():
            integers[key] = tensors[0].to(device)
        elif all(torch.equal(tensors[0], t) for t in tensors[1:]):
            # The frozen prefix is the same in every ingredient: one copy, not one per ingredient, which
            # is what lets 8 ViT-B ingredients fit on one GPU.
            shared[key] = tensors[0].float().to(device)
        else:
            stacked[key] = torch.stack([t.float() for t in tensors]).to(device)
    k = len(ingredients)
    columns = len(stacked) if options["per_layer"] else 1
    if not stacked:  # one ingredient, or identical ones: nothing to learn
        state = {key: value.cpu() for key, value in {**shared, **integers}.items()}
        return Soup(state, [(c, 1.0 / k) for c in ingredients], [],
                    {"coefficients": {"per_layer": False, "ingredients": [1.0 / k] * k}})
    # Logits at zero start from the uniform soup; AdamW's small weight decay pulls back toward it.
    logits = torch.zeros(k, columns, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([logits], lr=options["lr"])
    dataset = select.loader.dataset
    loader = DataLoader(dataset, batch_size=options["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(0), num_workers=select.loader.num_workers,
                        pin_memory=device.type == "cuda")
    model = select.model.eval()  # eval: BatchNorm uses the mixed running statistics, as the soup will
    fixed = {**shared, **integers}
    buffers = frozenset(name for name, _ in model.named_buffers())
    dtype = torch.bfloat16 if device.type == "cuda" else None
    steps = []
    console.print(f"  learned: {k} ingredients, {len(stacked)} of {len(stacked) + len(shared)} floating "
                  f"tensors differ; {k * columns} coefficients, {options['epochs']} epochs on {select.split}")
    for epoch in range(options["epochs"]):
        loss_sum, seen = 0.0, 0
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            params = {**fixed, **_mix_parameters(stacked, logits.softmax(dim=0), buffers)}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = functional_call(model, params, (images,))
            loss = F.cross_entropy(out.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(targets)
            seen += len(targets)
        mean = logits.detach().softmax(dim=0).mean(dim=1).cpu()
        steps.append({"epoch": epoch + 1, "loss": loss_sum / seen, "coefficients": mean.tolist()})
        console.print(f"  learned: epoch {epoch + 1}: loss {loss_sum / seen:.3f}, coefficients "
                      + " ".join(f"{c:.2f}" for c in mean.tolist()))
    with torch.no_grad():
        coefficients = logits.softmax(dim=0).cpu()
        mixed = _mix_parameters({kk: v.cpu() for kk, v in stacked.items()}, coefficients)
    state = {**{kk: v.cpu() for kk, v in fixed.items()}, **mixed}
    # Each column sums to one, so the mean over tensors does too: one weight per member for the metadata.
    weights = coefficients.mean(dim=1).tolist()
    record = {"per_layer": options["per_layer"], "ingredients": weights}
    if options["per_layer"]:
        record["layers"] = {key: coefficients[:, j].tolist() for j, key in enumerate(stacked)}
    return Soup(state, list(zip(ingredients, weights)), steps, {"coefficients": record})


@soup_method("stock")
def stock_soup(ingredients: list[Checkpoint], select: Selector | None, console: Console,
               kitchen: Kitchen | None = None) -> Soup:
    """Model Stock (Jang et al., ECCV 2024): per tensor, the ingredients' average pulled toward the start
    by the angle between their fine-tuning deltas; no data needed, two ingredients suffice."""
    if len(ingredients) < 2:
        raise SoupError("the stock soup needs at least two ingredients: it measures the angle between their "
                        "fine-tuning deltas")
    start = _kitchen(kitchen, ingredients, "stock").start()
    k = len(ingredients)
    state, ratios, cosines = {}, {}, {}
    for key, tensors in tensors_across(ingredients):
        if not tensors[0].is_floating_point():
            state[key] = tensors[0]
            continue
        origin = start[key].float()
        deltas = torch.stack([t.float() - origin for t in tensors]).flatten(1)
        unit = F.normalize(deltas.double(), dim=1)
        gram = unit @ unit.T
        cosine = ((gram.sum() - gram.diagonal().sum()) / (k * (k - 1))).item()
        # A negative cosine would put the soup beyond the start, away from every ingredient: clamp to the
        # start (t = 0). Zero deltas (frozen tensors) give cosine 0 and t = 0, i.e. the start they equal.
        cosine = min(max(cosine, 0.0), 1.0)
        ratio = k * cosine / (1 + (k - 1) * cosine)
        state[key] = origin + ratio * deltas.mean(dim=0).view_as(origin)
        ratios[key], cosines[key] = ratio, cosine
    moved = [key for key in ratios if cosines[key] > 0]
    mean_ratio = sum(ratios[key] for key in moved) / max(1, len(moved))
    console.print(f"  stock: {len(moved)} tensors moved from the start; mean ratio toward the average "
                  f"{mean_ratio:.3f} (1 = uniform soup, 0 = start)")
    extra = {"stock": {"mean_ratio": mean_ratio, "ratios": ratios, "cosines": cosines}}
    return Soup(state, [(c, 1.0 / k) for c in ingredients], [], extra)


def parse_alphas(alpha: str | float) -> list[float]:
    """'0.5' -> [0.5]; '0:1:0.1' -> [0.0, 0.1, ..., 1.0] (stop included)."""
    text = str(alpha).strip()
    try:
        if ":" not in text:
            return [float(text)]
        first, last, step = (float(part) for part in text.split(":"))
    except ValueError:
        raise SoupError(f"--alpha {text}: expected a number or start:stop:step, e.g. 0.5 or 0:1:0.1") from None
    if step <= 0 or last < first:
        raise SoupError(f"--alpha {text}: needs start <= stop and step > 0, e.g. 0:1:0.1")
    count = math.floor((last - first) / step + 1e-9) + 1
    return [round(first + i * step, 10) for i in range(count)]


@soup_method("interpolate", takes_soups=True, options={"alpha": "0.5"})
def interpolate_soup(ingredients: list[Checkpoint], select: Selector | None, console: Console,
                     kitchen: Kitchen | None = None) -> Soup:
    """WiSE-FT (Wortsman et al., CVPR 2022): (1 - alpha)·A + alpha·B for A B, or from the starting
    weights (with B's trained head) to B when only B is given; an alpha sweep keeps the best on held-out data."""
    kitchen = _kitchen(kitchen, ingredients, "interpolate")
    if len(ingredients) not in (1, 2):
        raise SoupError(f"--interpolate takes B (from the starting weights) or A B; got {len(ingredients)} "
                        "checkpoints")
    alphas = parse_alphas(kitchen.options["alpha"])
    if len(alphas) > 1 and select is None:
        raise SoupError("an --alpha sweep needs held-out data to choose alpha; give one --alpha or drop --no-eval")
    b = ingredients[-1]
    if len(ingredients) == 2:
        a, a_name = ingredients[0], ingredients[0].name
    else:
        # The start's head is a random init_seed draw; WiSE-FT interpolates the backbone and keeps a trained head.
        b_state = b.state_dict()
        a = {**kitchen.start(), **{key: b_state[key] for key in b_state if key.startswith("head.")}}
        a_name = "start"

    def mix(alpha: float) -> dict[str, torch.Tensor]:
        # Integer buffers from the nearer endpoint, so alpha 0 and 1 give the endpoints exactly.
        pair = [(a, 1 - alpha), (b, alpha)]
        return weighted_average(pair if alpha <= 0.5 else pair[::-1])

    steps, best = [], None
    for alpha in alphas:
        if select is None:
            break
        top1 = select(mix(alpha))["top1"]
        steps.append({"alpha": alpha, "top1": top1})
        console.print(f"  interpolate: alpha {alpha:g} ({a_name} -> {b.name}): {top1:.2%} on {select.split}")
        if best is None or top1 > best[1]:
            best = (alpha, top1)
    alpha = best[0] if best else alphas[0]
    if len(alphas) > 1:
        console.print(f"  interpolate: best alpha {alpha:g}")
    members = [(b, alpha)] if a_name == "start" else [(a, 1 - alpha), (b, alpha)]
    extra = {"interpolation": {"a": a_name, "b": b.name, "alpha": alpha, "sweep": steps}}
    if a_name == "start":
        extra["start_weight"] = 1 - alpha
    return Soup(mix(alpha), members, steps, extra)


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
         device: torch.device | None = None, options: dict | None = None, calibrate: bool = False,
         overwrite: bool = False) -> Path:
    """Cook one soup with `method` and write it as a normal checkpoint with its provenance. `options` are
    the method's own (e.g. alpha for interpolate, per_layer for learned); others are refused. `calibrate`
    fits the soup's temperature on the selection split and stores it in the metadata. An existing
    `out` is replaced only with `overwrite`, and never when it is an ingredient (see soup.outputs)."""
    console = console or Console()
    if method not in METHODS:
        raise SoupError(f"unknown soup method {method!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[method]
    for option in options or {}:
        if option not in spec.options:
            owners = [f"--{m}" for m, s in METHODS.items() if option in s.options]
            flag = "--" + option.replace("_", "-")
            raise SoupError(f"{flag} is not an option of the {method} soup" +
                            (f"; it goes with {' or '.join(owners)}" if owners else ""))
    if not ingredients:
        raise SoupError("no ingredients to cook; train some with `soup train RECIPE` or name checkpoints")
    for checkpoint in ingredients:
        if checkpoint.kind != "ingredient" and not spec.takes_soups:
            raise SoupError(f"{checkpoint.path} is a {checkpoint.kind} soup, not an ingredient; cook from "
                            "the ingredients themselves")
    names = [c.name for c in ingredients]
    if len({c.path.resolve() for c in ingredients}) != len(ingredients):
        raise SoupError("the same ingredient is listed twice; a soup counts each ingredient once")
    check_output(out, [c.path for c in ingredients], overwrite, "soup", checkpoint=True)
    check_compatible(ingredients, force, console)
    check_finite(ingredients)
    if spec.needs_selection and select_on is None:
        without = " or ".join(f"--{m}" for m, s in METHODS.items() if not s.needs_selection)
        raise SoupError(f"the {method} soup needs held-out data; --no-eval works with {without} only")
    if calibrate and select_on is None:
        raise SoupError("--calibrate fits a temperature on held-out data; drop --no-eval")
    select = Selector(ingredients[0], select_on, data_root, device) if select_on else None
    console.print(f"[bold]{method} soup[/] of {len(ingredients)} ingredients" +
                  (f", selected on {select_on}" if select else ", without data"))
    soup = spec.fn(ingredients, select, console, Kitchen(ingredients[0], dict(options or {})))
    selection, extra = None, {}
    if select is not None:
        logits, targets = select.logits(soup.state_dict)
        result = scores(logits, targets)
        # Whether held-out scores chose or fitted the weights (greedy, learned, an alpha sweep), making a
        # later score on this split optimistic; uniform and stock are only checked on it.
        chose = spec.needs_selection or len(soup.steps) > 1
        selection = {"split": select_on, "root": select.root, "chose": chose, **result}
        console.print(f"  {method} soup: {result['top1']:.2%} on {select_on} (the selection set) with "
                      f"{len(soup.members)} of {len(ingredients)} ingredients")
        if calibrate:
            extra["calibration"] = calibration_record(logits, targets, select_on)
            print_calibration(f"{method} soup", extra["calibration"], console)
        if method == "greedy" and select_on == "holdout":
            extra["versus_best"] = versus_best(soup.state_dict, soup.members[0][0], "val", data_root,
                                               select.device, console)
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
        **soup.extra,
        **extra,
    }
    path = save_checkpoint(out, soup.state_dict, meta)
    console.print(f"  wrote {path}")
    return path
