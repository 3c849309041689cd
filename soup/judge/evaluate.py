"""`soup eval`'s rows: top-1, top-5, NLL and ECE for checkpoints, soups and their ensembles (the mean of
logits, or of probabilities across architectures), each checkpoint's stored temperature applied first;
the scoring itself is soup.score.evaluator's."""

from __future__ import annotations


import torch

from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint
from soup.models.metrics import scores
from soup.models.views import views_of
from soup.score.calibrate import temperature_of
from soup.score.evaluator import Evaluator, Predictions, predictions
from soup.score.stats import expected_calibration_error


def selection_split(checkpoint: Checkpoint) -> str | None:
    """The split whose scores chose or fitted this soup's weights, if any. A uniform or stock soup cooked
    with data was only checked on its split ("chose": false); soups from before that record count as chosen."""
    selection = checkpoint.record.selection
    return selection.split if selection and selection.chose_weights else None


def ensemble_logits(members: list[tuple[Checkpoint, torch.Tensor]]) -> tuple[torch.Tensor, str]:
    """The ensemble's logits and how they were combined. One architecture: the mean of logits (the paper's
    reference). Several: the mean of probabilities, since each architecture scales its logits its own way;
    returned as log-probabilities, so top-k are the ensemble's and the loss is its NLL."""
    first = members[0][0]
    for checkpoint, _ in members[1:]:
        if checkpoint.classes != first.classes:
            raise SoupError(f"--ensemble: {checkpoint.path} and {first.path} have different class lists; an "
                            "ensemble needs the same classes in the same order")
    backbones = list(dict.fromkeys(c.backbone for c, _ in members))
    if len(backbones) == 1:
        return torch.stack([lg for _, lg in members]).mean(0), "mean of logits"
    probabilities = torch.stack([lg.softmax(dim=1) for _, lg in members]).mean(0)
    return probabilities.clamp_min(1e-12).log(), f"mean of probabilities, {len(backbones)} architectures"


def score_row(logits: torch.Tensor, targets: list, classes: list[str], **fields) -> tuple[dict, Predictions]:
    """One row of the table (top-1, top-5, NLL, ECE and `fields`) and its per-image predictions."""
    outcome = predictions(logits, targets, classes)
    result = scores(logits, targets)
    return {**fields, **result, "nll": result["loss"],
            "ece": expected_calibration_error(outcome.confidence, outcome.correct)}, outcome


def tta_logits(per_view: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """--tta's logits: the mean over the views of each view's logits after the temperature."""
    return torch.stack([logits / temperature for logits in per_view]).mean(0)


def evaluate_rows(checkpoints: list[Checkpoint], evaluator: Evaluator, ensemble: bool = False,
                  tta: str | None = None) -> list[tuple[dict, Predictions]]:
    """One (row, per-image predictions) per checkpoint, and with `ensemble` one for the ensemble of the
    ingredients (of every checkpoint when fewer than two are ingredients, e.g. a DinoV2 soup and a SwinV2
    soup). A checkpoint's stored temperature divides its logits first (top-1 unchanged, NLL/ECE not). With
    `tta` (soup.models.views), each checkpoint's row is followed by its "+tta" row on the same images; the
    ensemble stays one of the plain rows."""
    rows, all_logits, targets = [], [], None
    temperatures = [temperature_of(c) for c in checkpoints]  # a bad one stops the command before any work
    for checkpoint, temperature in zip(checkpoints, temperatures):
        # One weight load for every view; each --tta choice's first view is the image, the plain row's.
        per_view = evaluator.view_logits(checkpoint, views_of(tta) if tta is not None else (None,))
        logits, targets = per_view[0]
        fields = dict(path=str(checkpoint.path), kind=checkpoint.kind,
                      members=len(checkpoint.record.members) or 1, split=evaluator.split,
                      selection_set=selection_split(checkpoint) == evaluator.split, temperature=temperature)
        rows.append(score_row(logits / temperature, targets, checkpoint.classes, name=checkpoint.name,
                              tta=None, **fields))
        if tta is not None:
            combined = tta_logits([lg for lg, _ in per_view], temperature)
            rows.append(score_row(combined, targets, checkpoint.classes, name=f"{checkpoint.name} +tta {tta}",
                                  tta=tta, **fields))
        all_logits.append((checkpoint, logits / temperature, targets))
    if ensemble:
        members = [m for m in all_logits if m[0].kind == "ingredient"]
        members = members if len(members) >= 2 else all_logits
        if len(members) < 2:
            raise SoupError("--ensemble needs at least two checkpoints (ingredients, or soups of one class list)")
        for checkpoint, _, member_targets in members[1:]:
            if member_targets != members[0][2]:
                raise SoupError(f"--ensemble: {checkpoint.path} and {members[0][0].path} read different "
                                f"{evaluator.split} images; pass --data ROOT so that all read the same ones")
        # The paper's reference: the ensemble costs one forward pass per member, a soup only one.
        combined, how = ensemble_logits([(c, lg) for c, lg, _ in members])
        rows.append(score_row(combined, members[0][2], members[0][0].classes,
                         name=f"ensemble ({how})", path="", kind="ensemble", members=len(members),
                         member_names=[c.name for c, _, _ in members], split=evaluator.split,
                         selection_set=False, temperature=1.0, tta=None))
    return rows


def eval_rows(checkpoints: list[Checkpoint], evaluator: Evaluator, ensemble: bool = False,
              tta: str | None = None) -> list[dict]:
    """The rows of `evaluate_rows`, without the per-image predictions."""
    return [row for row, _ in evaluate_rows(checkpoints, evaluator, ensemble, tta)]
