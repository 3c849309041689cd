"""Temperature scaling (Guo et al., ICML 2017): one scalar T that divides a checkpoint's logits, fitted by
LBFGS on the negative log-likelihood of a held-out split and stored in the checkpoint's metadata.

Dividing logits by a positive T never changes their order: top-1 and top-5 stay exactly as they were;
only the probabilities (NLL, calibration error, a probability ensemble) change. The weights are untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from rich.console import Console

from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint, read_checkpoint, rewrite_metadata
from soup.models.files import rewritable
from soup.models.records import TEMPERATURE_BOUNDS
from soup.score.stats import confidences, expected_calibration_error, nll
from soup.text import shown

_BOUNDS = TEMPERATURE_BOUNDS


def fit_temperature(logits: torch.Tensor, targets, max_iter: int = 100) -> float:
    """The T minimising NLL(softmax(logits / T), targets); fitted as log T, so T stays positive."""
    logits = logits.detach().double()
    targets = torch.as_tensor(targets).long()
    if len(targets) == 0:
        raise SoupError("cannot fit a temperature on no images")
    if not torch.isfinite(logits).all():
        raise SoupError("cannot fit a temperature: the logits hold NaN or infinite values")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = log_t.exp().item()
    return min(max(temperature, _BOUNDS[0]), _BOUNDS[1]) if math.isfinite(temperature) else 1.0


def calibration_record(logits: torch.Tensor, targets, split: str) -> dict:
    """Fit T on `logits` and report NLL and ECE before and after: what goes into the metadata."""
    targets = torch.as_tensor(targets).long()
    temperature = fit_temperature(logits, targets)
    record = {"temperature": temperature, "split": split, "images": len(targets)}
    for when, scaled in (("before", logits), ("after", logits / temperature)):
        predicted, confidence = confidences(scaled)
        record[f"nll_{when}"] = nll(scaled, targets)
        record[f"ece_{when}"] = expected_calibration_error(confidence, predicted == targets)
    return record


def temperature_of(checkpoint: Checkpoint) -> float:
    """The stored temperature, 1.0 when none; metadata is data, so anything but a number within the bounds
    that fitting keeps to is refused rather than used: a T of 1e-300 passes "finite positive" yet turns
    logits into infinities (NaN losses, changed ensemble votes)."""
    calibration = checkpoint.record.calibration
    return 1.0 if calibration is None else calibration.checked_temperature(checkpoint.path)


def temperature_label(temperature: float) -> str:
    """`T=0.001`, `T=1.43`, `T=1e+03`: three significant digits, so that a small T never prints as 0.00."""
    return "" if temperature == 1.0 else f"T={temperature:.3g}"


def calibrate(checkpoint: Checkpoint, evaluator, console: Console) -> dict:
    """Fit `checkpoint`'s temperature on `evaluator`'s split (an Evaluator: anything with .split and
    .logits(checkpoint)), store it in its metadata and report the change."""
    logits, targets = evaluator.logits(checkpoint)
    record = calibration_record(logits, targets, evaluator.split)
    rewrite_metadata(checkpoint.path, checkpoint.record.with_calibration(record))
    print_calibration(checkpoint.name, record, console)
    return record


def print_calibration(name: str, record: dict, console: Console) -> None:
    console.print(f"  {shown(name)}: {temperature_label(record['temperature']) or 'T=1'} fitted on {record['split']} "
                  f"({record['images']} images): NLL {record['nll_before']:.3f} -> {record['nll_after']:.3f}, "
                  f"ECE {record['ece_before']:.2%} -> {record['ece_after']:.2%}; top-1 unchanged")


def calibration_split(checkpoint: Checkpoint, split: str | None) -> str:
    """The split to fit on: the one asked for, else the soup's selection split, else val."""
    selection = checkpoint.record.selection
    return split or (selection.split if selection else None) or "val"


def calibrate_paths(paths, split: str | None, make_evaluator, console: Console) -> list[dict]:
    """`soup calibrate`: each checkpoint on its split; `make_evaluator(split)` builds one per split."""
    evaluators, records = {}, []
    for path in paths:
        rewritable(path)  # before any work: a file that cannot be rewritten in place stops the command
    for path in paths:
        checkpoint = read_checkpoint(path)
        chosen = calibration_split(checkpoint, split)
        if chosen not in evaluators:
            evaluators[chosen] = make_evaluator(chosen)
        records.append(calibrate(checkpoint, evaluators[chosen], console))
    return records
