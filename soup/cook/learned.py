"""The learned soup's fitting (Wortsman et al., ICML 2022) and its hyperplane form (MEHL-Soup, ECCV 2024).

Both fit mixing coefficients, and the paper's logit scale β, by gradient descent on the selection set.
Where the ingredients share the frozen prefix the selector's CachedScorer computed features for (same start
and freeze: the common case), fitting runs on those cached tokens through the trained suffix only; else
(another prefix, no cache, not a ViT) through the whole model. Same batches either way, so the same
coefficients within float rounding.

- softmax form: coefficients = softmax(logits) per ingredient (or per ingredient and tensor), all
  ingredients' differing tensors stacked on the device;
- hyperplane form: coefficients summing to one, each in [-bound, 1 + bound] (extrapolation allowed),
  fitted by block coordinate descent: a few coefficients at a time, the others frozen into one mixed
  copy, so the device holds the block's ingredients plus one model however many ingredients there are.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors import safe_open
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from soup.cook.selector import Selector
from soup.cook.weights import weighted_average
from soup.errors import SoupError
from soup.fast.decoded import gather
from soup.fast.prefix import to_device
from soup.models.checkpoint import Checkpoint, tensors_across
from soup.text import progress_bar


# The hyperplane coefficients' default room beyond the convex hull: each in [-0.5, 1.5].
DEFAULT_BOUND = 0.5
# Without --epochs the softmax fit runs 5 epochs and at least 100 AdamW steps: the paper's few epochs assume
# a held-out set of thousands of images, while on a few hundred 5 epochs are a couple of dozen steps, too few
# for the coefficients to leave the uniform soup (lr 0.05 moves a logit by about 0.05 a step).
MIN_EPOCHS, MIN_STEPS = 5, 100


def fitting_epochs(requested: int | None, batches: int) -> int:
    """Epochs of the softmax fit: those asked for, else enough for MIN_EPOCHS and MIN_STEPS."""
    return requested if requested is not None else max(MIN_EPOCHS, math.ceil(MIN_STEPS / max(1, batches)))


@dataclass
class Fitted:
    state: dict[str, torch.Tensor]
    weights: list[float]  # one per ingredient, in order
    steps: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class Fitting:
    """How fitting sees the selection set: cached prefix tokens through the suffix, or images through the
    whole model."""

    module: nn.Module
    names: dict[str, str]  # state-dict key -> the module's own name for that tensor
    loader: DataLoader
    fetch: Callable  # one loader batch -> (inputs, targets) on the device
    skip: frozenset  # state-dict keys the module never computes with (the cached prefix)
    description: str

    def logits(self, params: dict[str, torch.Tensor], inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
        named = {self.names[key]: value for key, value in params.items() if key not in self.skip}
        dtype = torch.bfloat16 if device.type == "cuda" else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return functional_call(self.module, named, (inputs,)).float()


def _shuffled(dataset, batch_size: int, num_workers: int, pin: bool) -> DataLoader:
    # One seed for both paths, and the sampler draws only from it: the cached path sees the same batches.
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                      num_workers=num_workers, pin_memory=pin)


def _names_in(module: nn.Module, model: nn.Module) -> dict[str, str]:
    """The model's state-dict keys -> the names `module` (which shares the model's tensors) gives them."""
    ids = {id(t): name for name, t in module.state_dict(keep_vars=True).items()}
    return {key: ids[id(t)] for key, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


def cached_prefix(select: Selector, shared: dict[str, torch.Tensor]) -> list[str] | None:
    """State-dict keys of the cached prefix when fitting may run on its tokens: the selector holds prefix
    features and every prefix tensor is shared by all ingredients and equal to the one the features were
    computed with. Else None."""
    cached = getattr(select, "cached", None)
    if cached is None or cached.features is None:
        return None
    ids = {id(t): key for key, t in select.model.state_dict(keep_vars=True).items()}
    keys = [ids.get(id(t)) for t in cached.split.prefix_state()]
    for key, reference in zip(keys, cached.reference):
        if key not in shared or not torch.equal(shared[key].to(reference.device, reference.dtype), reference):
            return None
    return keys


def fitting(select: Selector, shared: dict[str, torch.Tensor], batch_size: int) -> Fitting:
    device, model = select.device, select.model.eval()  # eval: BatchNorm uses the mixed running statistics
    prefix = cached_prefix(select, shared)
    if prefix is None:
        why = "no prefix cache" if getattr(select, "cached", None) is None or select.cached.features is None \
            else "the ingredients' prefix is not the cached one"
        loader = _shuffled(select.loader.dataset, batch_size, select.loader.num_workers, device.type == "cuda")
        return Fitting(model, _names_in(model, model), loader,
                       lambda b: (b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True)),
                       frozenset(), f"the whole model ({why})")
    cached = select.cached
    positions = cached.features.positions(cached.rows)
    tokens, targets = cached.features.tokens, cached.features.targets[positions]
    at_store, load = positions.to(tokens.device), to_device(device)
    suffix = cached.suffix.eval()
    return Fitting(suffix, _names_in(suffix, model), _shuffled(range(len(positions)), batch_size, 0, False),
                   lambda rows: (load(gather(tokens, at_store[rows.to(at_store.device)])), targets[rows].to(device)),
                   frozenset(prefix), f"prefix cache ({cached.split.k} blocks), suffix only")


def mix_parameters(stacked: dict[str, torch.Tensor], coefficients: torch.Tensor,
                   buffers: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """Σₖ cₖ·θₖ for each stacked tensor; `coefficients` is (ingredients, 1) or (ingredients, tensors).
    Buffers (BatchNorm statistics) are mixed alike but without gradient: they are not parameters."""
    per_tensor = coefficients.shape[1] > 1
    return {key: torch.tensordot((coefficients.detach() if key in buffers else coefficients)[
                :, j if per_tensor else 0], stack, dims=1)
            for j, (key, stack) in enumerate(stacked.items())}


def scan(ingredients: list[Checkpoint], stack: bool) -> tuple[dict, dict, list[str]]:
    """(shared, stacked, differing keys), on the CPU: tensors equal in every ingredient (the frozen prefix)
    and integer buffers once, the floating tensors that differ stacked per ingredient (`stack`) or only
    named."""
    shared, stacked, differing = {}, {}, []
    for key, tensors in tensors_across(ingredients):
        if not tensors[0].is_floating_point() or all(torch.equal(tensors[0], t) for t in tensors[1:]):
            shared[key] = tensors[0].float() if tensors[0].is_floating_point() else tensors[0]
        else:
            differing.append(key)
            if stack:
                stacked[key] = torch.stack([t.float() for t in tensors])
    return shared, stacked, differing


def _step(fit: Fitting, params: dict, scale: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor,
          optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    # The paper's learned soup scales the soup's logits by β (here exp of a learned log-scale) while fitting.
    loss = F.cross_entropy(fit.logits(params, inputs, device) * scale.exp(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * len(targets)


def fit_softmax(ingredients: list[Checkpoint], select: Selector, console: Console, options: dict) -> Fitted:
    """The paper's learned soup: softmax coefficients and β by AdamW, all ingredients stacked."""
    device, k = select.device, len(ingredients)
    shared, stacked, _ = scan(ingredients, stack=True)
    if not stacked:  # one ingredient, or identical ones: nothing to learn
        return Fitted(shared, [1.0 / k] * k, [], {"coefficients": {"per_layer": False, "ingredients": [1.0 / k] * k}})
    fit = fitting(select, shared, options["batch_size"])
    epochs = fitting_epochs(options["epochs"], len(fit.loader))
    fixed = {key: value.to(device) for key, value in shared.items() if key not in fit.skip}
    on_device = {key: value.to(device) for key, value in stacked.items()}
    columns = len(stacked) if options["per_layer"] else 1
    buffers = frozenset(name for name, _ in select.model.named_buffers())
    # Logits at zero start from the uniform soup, β at one; AdamW's small weight decay pulls back toward them.
    logits = torch.zeros(k, columns, device=device, requires_grad=True)
    scale = torch.zeros((), device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([logits, scale], lr=options["lr"])
    console.print(f"  learned: {k} ingredients, {len(stacked)} of {len(stacked) + len(shared)} tensors differ; "
                  f"{k * columns} coefficients and β, {epochs} epochs on {select.split} through "
                  f"{fit.description}")
    steps = []
    with progress_bar(console, "learned: epochs", epochs) as advance:
        for epoch in range(epochs):
            loss_sum, seen = 0.0, 0
            for batch in fit.loader:
                inputs, targets = fit.fetch(batch)
                params = {**fixed, **mix_parameters(on_device, logits.softmax(dim=0), buffers)}
                loss_sum += _step(fit, params, scale, targets, inputs, optimizer, device)
                seen += len(targets)
            mean = logits.detach().softmax(dim=0).mean(dim=1).cpu()
            steps.append({"epoch": epoch + 1, "loss": loss_sum / seen, "coefficients": mean.tolist(),
                          "logit_scale": scale.exp().item()})
            advance()
    # Every epoch's figures are in the soup's steps (`soup inspect` prints them).
    console.print(f"  learned: loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} over {epochs} epochs, β "
                  f"{steps[-1]['logit_scale']:.3f}, coefficients " + " ".join(f"{c:.2f}" for c in steps[-1]["coefficients"]))
    with torch.no_grad():
        coefficients = logits.softmax(dim=0).cpu()
        mixed = mix_parameters(stacked, coefficients)
    # Each column sums to one, so the mean over tensors does too: one weight per member for the metadata.
    weights = coefficients.mean(dim=1).tolist()
    record = {"per_layer": options["per_layer"], "ingredients": weights, "logit_scale": scale.exp().item(),
              "epochs": epochs, "fitted_on": fit.description}
    if options["per_layer"]:
        record["layers"] = {key: coefficients[:, j].tolist() for j, key in enumerate(stacked)}
    return Fitted({**shared, **mixed}, weights, steps, {"coefficients": record})


def project(v: torch.Tensor, total: float, low: float, high: float) -> torch.Tensor:
    """The point nearest `v` whose entries lie in [low, high] and sum to `total`: clamp(v - τ, low, high),
    τ found by bisection (the sum falls as τ grows). Needs len(v)·low <= total <= len(v)·high."""
    v64 = v.detach().double()
    below, above = (v64.min() - high).item(), (v64.max() - low).item()  # sums n·high and n·low
    for _ in range(200):
        tau = (below + above) / 2
        if (v64 - tau).clamp(low, high).sum().item() > total:
            below = tau
        else:
            above = tau
    return (v64 - (below + above) / 2).clamp(low, high).to(v.dtype)


def _read(ingredients: list[Checkpoint], keys: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The `keys` of every ingredient stacked on `device`, reading only those tensors from the files."""
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(c.path), framework="pt")) for c in ingredients]
        return {key: torch.stack([f.get_tensor(key).float() for f in files]).to(device) for key in keys}


def _frozen_mix(ingredients: list[Checkpoint], coefficients: list[float], keys: list[str],
                device: torch.device) -> dict[str, torch.Tensor]:
    """Σ cᵢ·θᵢ over the differing `keys` of the ingredients outside the block, one ingredient at a time."""
    total = {}
    for checkpoint, c in zip(ingredients, coefficients):
        for key, value in _read([checkpoint], keys, device).items():
            total[key] = total[key] + c * value[0] if key in total else c * value[0]
    return total


def check_epochs(epochs) -> None:
    """The learned option `epochs`: None (5, and at least 100 steps) or a whole number, at least 1."""
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise SoupError(f"learned epochs {epochs!r}: expected a whole number of epochs, at least 1")


def check_options(options: dict) -> None:
    """What no single option says: the options that go together (each alone is checked where declared)."""
    if options["hyperplane"] and options["per_layer"]:
        raise SoupError("--hyperplane fits one coefficient per ingredient; drop --per-layer")
    if options["bound"] is not None and not options["hyperplane"]:
        raise SoupError("--bound limits the --hyperplane coefficients; add --hyperplane or drop --bound")


def fit_hyperplane(ingredients: list[Checkpoint], select: Selector, console: Console, options: dict) -> Fitted:
    """MEHL-Soup's learned soup on the affine hull: coefficients summing to one, each in [-B, 1 + B], by
    block coordinate descent (Adam on a block, projected back after each step) with β learned alongside."""
    device, k = select.device, len(ingredients)
    bound = DEFAULT_BOUND if options["bound"] is None else options["bound"]
    shared, _, differing = scan(ingredients, stack=False)
    if not differing:
        return Fitted(shared, [1.0 / k] * k, [], {"coefficients": {"hyperplane": True, "ingredients": [1.0 / k] * k}})
    if select.split == "val":
        # One line (fits 80 columns): extrapolating to fit val makes a later val figure optimistic.
        console.print("[yellow]warning[/]: fitted on val, val then is not an honest test; use --select-on holdout")
    fit = fitting(select, shared, options["batch_size"])
    fixed = {key: value.to(device) for key, value in shared.items() if key not in fit.skip}
    buffers = frozenset(name for name, _ in select.model.named_buffers())
    # float64 master copy: each block's sum stays what it was to the last bit, so the total stays one.
    coefficients = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = torch.zeros((), device=device, requires_grad=True)
    size = options["block"]
    # Consecutive blocks, the last wrapping round to the first ingredients: a block of one could not move.
    blocks = [[(i + j) % k for j in range(min(size, k))] for i in range(0, k, size)]
    # 0 - bound: -bound of a bound of 0 is -0.0, which prints as "-0".
    console.print(f"  learned (hyperplane): {k} coefficients in [{0 - bound:g}, {1 + bound:g}] summing to one and β, "
                  f"{options['rounds']} rounds over blocks of {size} on {select.split} through {fit.description}")
    steps = []
    with progress_bar(console, "hyperplane: blocks", options["rounds"] * len(blocks)) as advance:
        for round_, block in ((r, b) for r in range(options["rounds"]) for b in blocks):
            others = [i for i in range(k) if i not in block]
            base = _frozen_mix([ingredients[i] for i in others], coefficients[others].tolist(), differing, device)
            stacks = _read([ingredients[i] for i in block], differing, device)
            total = coefficients[block].sum().item()
            c = coefficients[block].float().to(device).requires_grad_(True)
            optimizer = torch.optim.Adam([c, scale], lr=options["lr"])
            loss_sum, seen = 0.0, 0
            for batch in fit.loader:
                inputs, targets = fit.fetch(batch)
                mixed = mix_parameters(stacks, c.unsqueeze(1), buffers)
                params = {**fixed, **{key: mixed[key] + base[key] if key in base else mixed[key] for key in mixed}}
                loss_sum += _step(fit, params, scale, targets, inputs, optimizer, device)
                seen += len(targets)
                with torch.no_grad():
                    c.copy_(project(c, total, -bound, 1 + bound))
            coefficients[block] = project(c.detach().cpu().double(), total, -bound, 1 + bound)
            steps.append({"round": round_ + 1, "block": [ingredients[i].name for i in block], "loss": loss_sum / seen,
                          "coefficients": coefficients.tolist(), "logit_scale": scale.exp().item()})
            advance()
    console.print(f"  hyperplane: loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} over {len(steps)} blocks, "
                  "coefficients " + " ".join(f"{x:.2f}" for x in coefficients.tolist()))
    weights = coefficients.tolist()
    state = weighted_average(list(zip(ingredients, weights)))
    record = {"hyperplane": True, "bound": bound, "ingredients": weights, "logit_scale": scale.exp().item(),
              "fitted_on": fit.description}
    extra = {"coefficients": record}
    if select.split != "val":  # fitted elsewhere: val is an honest test of the soup, so report it
        state = select.prepare(state)  # the statistics the written soup will have
        result = Selector(ingredients[0], "val", select.evaluator.root, device, reset=select.reset)(state)
        console.print(f"  hyperplane soup: {result['top1']:.2%} on val (not used in fitting)")
        extra["reported"] = {"split": "val", **result}
    return Fitted(state, weights, steps, extra)
