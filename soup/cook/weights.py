"""Weight-space arithmetic shared by the soup methods and `soup inspect`: a streaming weighted average of
checkpoints (read one tensor at a time, so memory stays near one model however many are mixed) and the
starting weights an ingredient was fine-tuned from, rebuilt from its recipe and checked by fingerprint.
"""

from __future__ import annotations

from typing import Callable

import torch
from safetensors import safe_open

from soup.errors import SoupError
from soup.models.backbones import build_model, fingerprint
from soup.models.checkpoint import Checkpoint, read_checkpoint
from soup.recipe.spec import recipe_from_dict
from soup.train.probe import load_probe, probed_start


def starting_weights(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The weights `checkpoint`'s ingredients started from, rebuilt from its recipe exactly as training
    built them (pretrained backbone or model.weights, head from init_seed or the probed head), checked by
    fingerprint. A mismatch names its cause: the recipe's start, or the probed start found for it."""
    if not checkpoint.record.start.known:
        raise SoupError(f"{checkpoint.path}: imported without its start (soup import without --start), so the "
                        "weights it was fine-tuned from are unknown; import it again with --start FILE or --start "
                        "pretrained")
    recipe = recipe_from_dict(checkpoint.recipe)
    model = build_model(recipe.model, checkpoint.classes, recipe.data.image_size, recorded_in=checkpoint.path)
    probe = probed_start(recipe, checkpoint)
    if probe is not None:
        trained_from, start = read_checkpoint(probe).fingerprint, fingerprint(model)
        _same_start(checkpoint, recipe, start, trained_from)
        load_probe(model, probe, start)
        rebuilt = fingerprint(model)
        if rebuilt != checkpoint.fingerprint:
            raise SoupError(f"{probe}: this probed start is not the one {checkpoint.path} started from (fingerprint "
                            f"{rebuilt}, not {checkpoint.fingerprint}): it was changed or trained again, e.g. on "
                            f"other data; restore the original {probe.parent.name} folder")
    else:
        _same_start(checkpoint, recipe, fingerprint(model), checkpoint.fingerprint)
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone()
            for k, v in model.state_dict().items()}


def rebuilt_starts(checkpoints: list[Checkpoint]) -> tuple[dict[str, dict | None], dict[str, SoupError]]:
    """Each start among `checkpoints`, rebuilt once per fingerprint (starting_weights), and the error of
    each that cannot be (offline, moved: its start is None), both by fingerprint in first-seen order."""
    starts: dict[str, dict | None] = {}
    errors: dict[str, SoupError] = {}
    for checkpoint in checkpoints:
        if checkpoint.fingerprint not in starts:
            try:
                starts[checkpoint.fingerprint] = starting_weights(checkpoint)
            except SoupError as err:
                starts[checkpoint.fingerprint], errors[checkpoint.fingerprint] = None, err
    return starts, errors


def _same_start(checkpoint: Checkpoint, recipe, rebuilt: str, expected: str) -> None:
    if rebuilt != expected:
        source = recipe.model.weights or recipe.model.backbone
        raise SoupError(f"{checkpoint.path}: the recipe's start ({source}) now rebuilds with fingerprint "
                        f"{rebuilt}, not the {expected} its ingredients started from; restore "
                        "the original weights file (model.weights) or torch.hub/timm cache")


def _reader(source: Checkpoint | dict) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """(keys, get) for an in-memory state dict, or for a checkpoint file read one tensor at a time with the
    file open only while that tensor is read: a file kept open keeps every page it has handed out mapped (and
    counted in RSS), so N files held open at once would make cooking's memory grow with N."""
    if isinstance(source, dict):
        return list(source), source.__getitem__
    path = str(source.path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())

    def get(key: str) -> torch.Tensor:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)
    return keys, get


def weighted_average(members: list[tuple[Checkpoint | dict, float]]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·θᵢ over floating tensors, accumulated in fp32, one tensor name at a time across the members;
    integer buffers (BatchNorm's num_batches_tracked) are copied from the first member, never averaged
    into floats. A tensor equal in every member, with weights summing to one, is kept bit for bit: Σ θ/3
    is not always θ in floats, and a frozen prefix must stay the start's exactly (its cached features,
    and what a soup claims to have left alone, depend on it). No member is modified."""
    weights = [weight for _, weight in members]
    keeps_equal = abs(sum(weights) - 1.0) < 1e-6
    total: dict[str, torch.Tensor] = {}
    sources = [_reader(source) for source, _ in members]
    for key in sources[0][0]:
        first = sources[0][1](key)
        # Copies: a member may be an in-memory state (the start) that later mixes still read.
        if not first.is_floating_point():
            total[key] = first.clone()
            continue
        mixed, same = first.to(torch.float32, copy=True).mul_(weights[0]), True
        for (_, get), weight in zip(sources[1:], weights[1:]):
            tensor = get(key)
            same = same and torch.equal(tensor, first)
            mixed.add_(tensor.float(), alpha=weight)
        total[key] = first.to(torch.float32, copy=True) if same and keeps_equal else mixed
    return total
