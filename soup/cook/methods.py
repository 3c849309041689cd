"""The soup methods (uniform, greedy, top-k, ensemble-guided greedy, learned, Model Stock, WiSE-FT
interpolation); the greedy family's shared steps are in soup.cook.greedy.

A method is ONE function: decorate it with `@soup_method(name, options=[Option(...)])` (soup.cook.registry)
here and `soup cook` gets its flag and its options' flags, `--best` a candidate and the demo a soup. It takes
the ingredients, a `Selector` (None when cooking without data), a console and a `Kitchen` (its options,
checked and with defaults filled in, and, on demand, the starting weights) and returns a `Soup`;
soup.cook.cooking checks the ingredients before and writes the checkpoint after, so a method only mixes
weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.console import Console

from soup.cook.batchnorm import StatsReset
from soup.cook.greedy import CRITERIA, Greedy, guided_order, rank, say_path, try_candidate
from soup.cook.learned import DEFAULT_BOUND, check_epochs, check_options, fit_hyperplane, fit_softmax
from soup.cook.registry import METHODS, Option, SoupMethod, settle_options, soup_method
from soup.cook.selector import Selector
from soup.cook.weights import starting_weights, weighted_average
from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, tensors_across
from soup.models.metadata import INTEGER, MAPPING, NUMBER, NUMBER_MAP, TEXT, declare_method_field
from soup.text import progress_bar, short_names, shown

__all__ = ["METHODS", "Kitchen", "Option", "Soup", "SoupMethod", "soup_method"]


@dataclass
class Soup:
    state_dict: dict[str, torch.Tensor]
    # (checkpoint, weight). The weights sum to one, except where a method mixes in the starting weights:
    # then `extra` records the start's share (interpolate) or the per-tensor ratios (stock).
    members: list[tuple[Checkpoint, float]]
    steps: list[dict] = field(default_factory=list)  # what the method tried, in order
    extra: dict = field(default_factory=dict)  # method-specific record, merged into the soup's metadata


@dataclass
class Kitchen:
    """What a method may use besides ingredients and selector: its options (every one it declares, checked,
    defaults filled in: cook and --best settle them) and the starting weights, rebuilt only when a method
    asks, since that may mean loading a pretrained model."""

    reference: Checkpoint
    options: dict = field(default_factory=dict)
    _start: dict | None = field(default=None, repr=False)
    # The selection's BatchNorm reset: told the start's statistics, so that a mix that is the start exactly
    # (an interpolation at alpha 0) keeps them, as a mix that is one ingredient does.
    reset: StatsReset | None = field(default=None, repr=False)

    def start(self) -> dict[str, torch.Tensor]:
        if self._start is None:
            self._start = starting_weights(self.reference)
            if self.reset is not None:
                self.reset.knows(self._start)
        return self._start


def _kitchen(kitchen: Kitchen | None, ingredients: list[Checkpoint], method: str) -> Kitchen:
    kitchen = kitchen or Kitchen(ingredients[0])
    kitchen.options = settle_options(method, kitchen.options)
    return kitchen


@soup_method("uniform")
def uniform_soup(ingredients: list[Checkpoint], select: Selector | None, console: Console,
                 kitchen: Kitchen | None = None) -> Soup:
    """The mean of all ingredients."""
    weight = 1.0 / len(ingredients)
    members = [(c, weight) for c in ingredients]
    return Soup(weighted_average(members), members)


def check_criterion(value) -> None:
    if value not in CRITERIA:
        raise SoupError(f"--criterion {value!r}: expected {' or '.join(CRITERIA)}")


declare_method_field("greedy", {"criterion": TEXT}, ("criterion",))


@soup_method("greedy", needs_selection=True, starts_from_best=True, options=[
    Option("criterion", str, "top1", "what each added ingredient must not worsen on held-out data: top1 (the "
           "paper's accuracy) or loss (cross-entropy, which still moves where a small held-out set ties on accuracy).",
           metavar="top1|loss", check=check_criterion)])
def greedy_soup(ingredients: list[Checkpoint], select: Selector, console: Console,
                kitchen: Kitchen | None = None) -> Soup:
    """The paper's recipe: rank ingredients by held-out accuracy, start from the best, and add each next
    one if the average with it does not lower held-out accuracy (--criterion loss: raise held-out loss)."""
    criterion = _kitchen(kitchen, ingredients, "greedy").options["criterion"]
    ranked = rank(ingredients, select, console)
    soup = Greedy([ranked[0].checkpoint], ranked[0].top1, ranked[0].outcome, loss=ranked[0].loss, criterion=criterion)
    by_loss = {"loss": ranked[0].loss} if criterion == "loss" else {}
    steps = [{"candidate": ranked[0].checkpoint.name, "top1": ranked[0].top1, "kept": True, **by_loss}]
    with progress_bar(console, "greedy: trying candidates", len(ranked) - 1) as advance:
        for item in ranked[1:]:
            steps.append(try_candidate(soup, item.checkpoint, select))
            advance()
    say_path("greedy" if criterion == "top1" else "greedy (by loss)", soup, ranked[0], steps, select.split, console)
    extra = {"greedy": {"criterion": criterion}} if criterion != "top1" else {}
    return Soup(weighted_average(soup.members()), soup.members(), steps, extra)


declare_method_field("topk", {"k": INTEGER}, ("k",))


@soup_method("topk", needs_selection=True, starts_from_best=True)
def topk_soup(ingredients: list[Checkpoint], select: Selector, console: Console,
              kitchen: Kitchen | None = None) -> Soup:
    """Uniform soups of the k best ingredients for every k; keeps the k that scores best on held-out data
    (ties: the smaller k)."""
    ranked = rank(ingredients, select, console)
    # k = 1 is the best ingredient alone, already scored by the ranking: an average of one is itself.
    curve = [{"k": 1, "added": ranked[0].checkpoint.name, "top1": ranked[0].top1}]
    with progress_bar(console, "topk: scoring k = 2, 3, ...", len(ranked) - 1) as advance:
        for k in range(2, len(ranked) + 1):
            top1 = select(weighted_average([(item.checkpoint, 1.0 / k) for item in ranked[:k]]))["top1"]
            curve.append({"k": k, "added": ranked[k - 1].checkpoint.name, "top1": top1})
            advance()
    best = max(curve, key=lambda point: point["top1"])  # the first of equals: the smaller k
    # The k best in the ranking's order (printed above): k adds the k-th.
    console.print(f"  topk: k = 1 to {len(ranked)}: " + " ".join(f"{p['top1']:.2%}" for p in curve)
                  + f"; best k = {best['k']}")
    members = [(item.checkpoint, 1.0 / best["k"]) for item in ranked[:best["k"]]]
    return Soup(weighted_average(members), members, curve, {"topk": {"k": best["k"]}})


declare_method_field("guided", MAPPING)


@soup_method("guided", needs_selection=True, starts_from_best=True, options=[
    Option("patience", int, 3, "stop after N candidates in a row are left out.", metavar="N", minimum=1)])
def guided_soup(ingredients: list[Checkpoint], select: Selector, console: Console,
                kitchen: Kitchen | None = None) -> Soup:
    """Ensemble-guided greedy: greedy's rule, trying next the candidate whose logit ensemble with the soup
    scores best (each ingredient's logits computed once), stopping after --patience rejections in a row;
    scores fewer weight sets than greedy."""
    patience = _kitchen(kitchen, ingredients, "guided").options["patience"]
    ranked = rank(ingredients, select, console, keep_logits=True)
    first, targets = ranked[0], ranked[0].outcome.targets
    soup = Greedy([first.checkpoint], first.top1, first.outcome, scored=len(ranked))
    steps = [{"candidate": first.checkpoint.name, "top1": first.top1, "kept": True}]
    member_logits, pool, misses = [first.logits], ranked[1:], 0
    with progress_bar(console, "guided: trying candidates", len(pool)) as advance:
        while pool and misses < patience:
            promise, item = guided_order(member_logits, pool, targets)[0]
            pool = [other for other in pool if other is not item]
            step = try_candidate(soup, item.checkpoint, select, {"ensemble_top1": promise})
            steps.append(step)
            member_logits += [item.logits] if step["kept"] else []
            misses = 0 if step["kept"] else misses + 1
            advance()
    say_path("guided", soup, first, steps, select.split, console)
    n, untried = len(ingredients), [item.checkpoint.name for item in pool]
    left = (f" ({len(untried)} candidate{'s' * (len(untried) != 1)} left untried after {patience} "
            f"rejection{'s' * (patience != 1)} in a row)" if untried else "")
    console.print(f"  guided: scored {soup.scored} weight sets; plain greedy scores {n} + {n - 1} = {2 * n - 1}"
                  + left)
    record = {"scored": soup.scored, "plain_greedy_scores": 2 * n - 1, "patience": patience, "untried": untried}
    return Soup(weighted_average(soup.members()), soup.members(), steps, {"guided": record})


@soup_method("learned", needs_selection=True, options=[
    Option("per_layer", bool, False, "one coefficient per ingredient and tensor."),
    Option("hyperplane", bool, False, "coefficients summing to one, free in sign within --bound (MEHL-Soup), fitted "
           "a few at a time; fit with --select-on holdout."),
    Option("bound", float, None, f"with --hyperplane, each coefficient in [-B, 1+B]; {DEFAULT_BOUND} by default, 0 is "
           "the convex hull.", metavar="B", minimum=0, maximum=10),
    # Fitting knobs, off the command line: the defaults suit a held-out set of hundreds to thousands.
    Option("block", int, 2, "--hyperplane: coefficients fitted together (their sum is fixed).", minimum=2, cli=False),
    Option("rounds", int, 2, "--hyperplane: passes over the blocks.", minimum=1, cli=False),
    Option("epochs", int, None, "epochs of the softmax fit (default: 5 and at least 100 steps).",
           check=check_epochs, cli=False),
    Option("lr", float, 0.05, "AdamW's learning rate for the coefficients.", minimum=0, cli=False),
    Option("batch_size", int, 32, "images a step.", minimum=1, cli=False)])
def learned_soup(ingredients: list[Checkpoint], select: Selector, console: Console,
                 kitchen: Kitchen | None = None) -> Soup:
    """The paper's learned soup: softmax mixing coefficients per ingredient (or per ingredient and tensor,
    --per-layer) and a logit scale, fitted by gradient descent on the held-out set; --hyperplane: coefficients
    summing to one, free in sign within --bound."""
    options = _kitchen(kitchen, ingredients, "learned").options
    check_options(options)
    fit = (fit_hyperplane if options["hyperplane"] else fit_softmax)(ingredients, select, console, options)
    return Soup(fit.state, list(zip(ingredients, fit.weights)), fit.steps, fit.extra)


declare_method_field("stock", {"mean_ratio": NUMBER, "ratios": NUMBER_MAP, "cosines": NUMBER_MAP}, ("mean_ratio",))


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
                  f"{mean_ratio:.3f} (1 = uniform, 0 = start)")
    extra = {"stock": {"mean_ratio": mean_ratio, "ratios": ratios, "cosines": cosines}}
    return Soup(state, [(c, 1.0 / k) for c in ingredients], [], extra)


# 0:1:0.001. Each point of a sweep is one evaluation on the selection set: past this a sweep runs for hours.
MAX_ALPHA_POINTS = 1001
FLOAT32_MAX = torch.finfo(torch.float32).max


def parse_alphas(alpha: str | float) -> list[float]:
    """'0.5' -> [0.5]; '0:1:0.1' -> [0.0, 0.1, ..., 1.0] (stop included); finite numbers only, at most
    MAX_ALPHA_POINTS of them."""
    text = str(alpha).strip()
    try:
        parts = [float(part) for part in text.split(":")]
        if len(parts) not in (1, 3):
            raise ValueError
    except ValueError:
        raise SoupError(f"--alpha {text}: expected a number or start:stop:step, e.g. 0.5 or 0:1:0.1") from None
    if not all(abs(part) <= FLOAT32_MAX for part in parts):  # the weights mix in float32
        raise SoupError(f"--alpha {text}: expected numbers finite in float32, not nan or inf (they turn the "
                        "soup's weights into NaN)")
    if len(parts) == 1:
        return parts
    first, last, step = parts
    if step <= 0 or last < first:
        raise SoupError(f"--alpha {text}: needs start <= stop and step > 0, e.g. 0:1:0.1")
    intervals = (last - first) / step  # inf when the division overflows: too many, like any other excess
    count = math.floor(intervals + 1e-9) + 1 if intervals < MAX_ALPHA_POINTS else MAX_ALPHA_POINTS + 1
    if count > MAX_ALPHA_POINTS:
        raise SoupError(f"--alpha {text}: more than {MAX_ALPHA_POINTS} points, each one evaluation on the "
                        f"selection set; take a step of at least (stop - start) / {MAX_ALPHA_POINTS - 1}")
    return [round(first + i * step, 10) for i in range(count)]


declare_method_field("interpolation", MAPPING)
declare_method_field("start_weight", NUMBER)  # the starting weights' share, where a method mixes them in


@soup_method("interpolate", takes_soups=True, options=[
    Option("alpha", str, "0.5", "weight of B, or a sweep such as 0:1:0.1 that keeps the best.",
           metavar="A|START:STOP:STEP", check=parse_alphas)])
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
        state = weighted_average(pair if alpha <= 0.5 else pair[::-1])
        # A finite alpha far outside [0, 1] can still overflow float32: never a soup of infinities.
        overflow = next((key for key, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()),
                        None)
        if overflow is not None:
            raise SoupError(f"--alpha {alpha:g}: the soup's tensor {overflow} overflows to inf or NaN; take an "
                            "alpha nearer [0, 1]")
        return state

    steps, best = [], None
    with progress_bar(console, "interpolate: scoring alphas", len(alphas) if select else 0) as advance:
        for alpha in alphas if select is not None else []:
            top1 = select(mix(alpha))["top1"]
            steps.append({"alpha": alpha, "top1": top1})
            if best is None or top1 > best[1]:
                best = (alpha, top1)
            advance()
    alpha = best[0] if best else alphas[0]
    if steps:
        labels = short_names([a_name, b.name])
        console.print(f"  interpolate ({shown(labels[a_name])} -> {shown(labels[b.name])}) on {select.split}: "
                      + ", ".join(f"alpha {s['alpha']:g} {s['top1']:.2%}" for s in steps)
                      + (f"; best alpha {alpha:g}" if len(alphas) > 1 else ""))
    members = [(b, alpha)] if a_name == "start" else [(a, 1 - alpha), (b, alpha)]
    extra = {"interpolation": {"a": a_name, "b": b.name, "alpha": alpha, "sweep": steps}}
    if a_name == "start":
        extra["start_weight"] = 1 - alpha
    return Soup(mix(alpha), members, steps, extra)
