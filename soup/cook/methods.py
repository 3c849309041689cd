"""The soup methods (uniform, greedy, learned, Model Stock, WiSE-FT interpolation) and their registry.

A method is ONE function, registered in ONE place: decorate it with `@soup_method(name, ...)` here and it
is in METHODS, which `soup cook` (one flag per method), the demo and the tests read. It takes the
ingredients, a `Selector` (None when cooking without data), a console and a `Kitchen` (its options and,
on demand, the starting weights) and returns a `Soup`; soup.cook.cooking checks the ingredients before and writes
the checkpoint after, so a method only mixes weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console

from soup.cook.learned import check_options, fit_hyperplane, fit_softmax
from soup.cook.selector import Selector
from soup.cook.weights import starting_weights, weighted_average
from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, tensors_across
from soup.score.compare import describe_difference, difference
from soup.score.evaluator import Predictions
from soup.text import shown


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
        console.print(f"  {shown(checkpoint.name)}: {result['top1']:.2%} on {select.split}")
        scored.append((result["top1"], checkpoint, outcome))
    scored.sort(key=lambda item: -item[0])  # stable: ties keep the order given
    best_acc, best, best_outcome = scored[0]
    kept = [best]
    steps = [{"candidate": best.name, "top1": best_acc, "kept": True}]
    console.print(f"  greedy: start from {shown(best.name)} ({best_acc:.2%})")
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
        console.print(f"  greedy: + {shown(candidate.name)} -> {acc:.2%} on {select.split}{said}: {verdict}{noise}")
        if keep:
            kept.append(candidate)
            best_acc, best_outcome = acc, outcome
    members = [(c, 1.0 / len(kept)) for c in kept]
    return Soup(weighted_average(members), members, steps)


@soup_method("learned", needs_selection=True,
             options={"per_layer": False, "hyperplane": False, "bound": None, "block": 2, "rounds": 2,
                      "epochs": 5, "lr": 0.05, "batch_size": 32})
def learned_soup(ingredients: list[Checkpoint], select: Selector, console: Console,
                 kitchen: Kitchen | None = None) -> Soup:
    """The paper's learned soup: softmax mixing coefficients per ingredient (or per ingredient and tensor,
    --per-layer) and a logit scale, fitted by gradient descent on the held-out set; --hyperplane: coefficients
    summing to one, free in sign within --bound."""
    options = _kitchen(kitchen, ingredients, "learned").options
    check_options(options)
    fit = (fit_hyperplane if options["hyperplane"] else fit_softmax)(ingredients, select, console, options)
    return Soup(fit.state, list(zip(ingredients, fit.weights)), fit.steps, fit.extra)


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
        console.print(f"  interpolate: alpha {alpha:g} ({shown(a_name)} -> {shown(b.name)}): {top1:.2%} "
                      f"on {select.split}")
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
