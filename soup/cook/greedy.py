"""The greedy family's shared steps (greedy, top-k, ensemble-guided greedy; registered in soup.cook.methods):
ranking the ingredients on the selection set, and trying one candidate in the soup under the paper's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console

from soup.cook.weights import weighted_average
from soup.models.checkpoint import Checkpoint
from soup.models.inference import NonFiniteLogits
from soup.models.metrics import scores
from soup.score.compare import describe_difference, difference
from soup.score.evaluator import Predictions, predictions
from soup.text import first_time, progress_bar, short_names, shown


def judged(select, state_dict: dict) -> tuple[dict, Predictions | None]:
    """Scores and per-image predictions; a bare scoring function (a stand-in selector) has no per-image
    predictions, and then no interval is given."""
    judge = getattr(select, "judged", None)
    return judge(state_dict) if judge else (select(state_dict), None)


# What a candidate must not worsen on the selection set: the paper's accuracy, or the cross-entropy, whose
# finer steps still tell mixes apart where a small held-out set ties them on accuracy (one image each).
CRITERIA = ("top1", "loss")


@dataclass(eq=False)
class Ranked:
    top1: float
    checkpoint: Checkpoint
    outcome: Predictions | None
    logits: torch.Tensor | None = None  # selection-set logits, kept only where a method asks (guided)
    loss: float | None = None


def rank(ingredients: list[Checkpoint], select, console: Console, keep_logits: bool = False) -> list[Ranked]:
    """Every ingredient scored once on the selection set, best first; ties keep the order given."""
    ranked = []
    with progress_bar(console, f"scoring on {select.split}", len(ingredients)) as advance:
        for checkpoint in ingredients:
            try:
                if keep_logits:
                    logits, targets = select.logits(checkpoint.state_dict())
                    result, outcome = scores(logits, targets), predictions(logits, targets, checkpoint.classes)
                else:
                    (result, outcome), logits = judged(select, checkpoint.state_dict()), None
            except NonFiniteLogits as err:  # the selector knows its template, not which ingredient it scored
                raise err.named(str(checkpoint.path)) from None
            ranked.append(Ranked(result["top1"], checkpoint, outcome, logits, result.get("loss")))
            advance()
    ranked.sort(key=lambda item: -item.top1)  # stable: ties keep the order given
    labels = short_names(item.checkpoint.name for item in ranked)
    said = f"  ranked on {select.split}: " + ", ".join(f"{shown(labels[item.checkpoint.name])} {item.top1:.2%}"
                                                       for item in ranked)
    if first_time(said):  # greedy, top-k and guided in one command (--best, the demo) rank alike: once
        console.print(said)
    return ranked


@dataclass
class Greedy:
    """A greedy soup in the making: its members, its selection accuracy and per-image outcome."""

    kept: list[Checkpoint]
    top1: float
    outcome: Predictions | None
    scored: int = 0  # weight sets scored on the selection set, the ingredients' own included
    loss: float | None = None
    criterion: str = "top1"  # one of CRITERIA

    def members(self) -> list[tuple[Checkpoint, float]]:
        return [(c, 1.0 / len(self.kept)) for c in self.kept]


def try_candidate(soup: Greedy, candidate: Checkpoint, select, extra: dict | None = None) -> dict:
    """The paper's rule: add `candidate` if the uniform average with it scores at least the soup so far
    (`>=`, so a soup never falls below its best ingredient on the selection set); by the soup's criterion
    "loss", if its cross-entropy is at most the soup's so far. Returns the step."""
    trial = weighted_average([(c, 1.0 / (len(soup.kept) + 1)) for c in soup.kept + [candidate]])
    result, outcome = judged(select, trial)
    soup.scored += 1
    acc = result["top1"]
    by_loss = soup.criterion == "loss"
    keep = result["loss"] <= soup.loss if by_loss else acc >= soup.top1
    # The gain over the soup so far on the same images: an interval holding 0 means a tie within noise.
    gain = difference(outcome, soup.outcome) if outcome is not None else None
    step = {"candidate": candidate.name, "top1": acc, "kept": keep, **({"loss": result["loss"]} if by_loss else {}),
            **(extra or {}), **({"gain": gain} if gain else {})}
    if keep:
        soup.kept.append(candidate)
        soup.top1, soup.outcome, soup.loss = acc, outcome, result.get("loss")
    return step


def tie(gain: dict | None) -> bool:
    """Whether a step's gain over the soup so far is a tie within noise (its paired interval holds 0)."""
    return bool(gain) and gain["low"] is not None and gain["low"] <= 0 <= gain["high"]


def say_path(label: str, soup: Greedy, first: Ranked, steps: list[dict], split: str, console: Console) -> None:
    """A greedy path in a line or a few (at 16 ingredients): where it started, the candidates kept and left out
    with the soup's accuracy with each, how many steps were a tie within noise, and the soup's gain over its
    first ingredient (paired interval). `soup inspect` shows each step's gain, the picture draws them."""
    labels = short_names(step["candidate"] for step in steps)
    tried = steps[1:]

    def said(items) -> str:
        return ", ".join(f"{shown(labels[s['candidate']])} ({s['top1']:.2%})" for s in items) or "none"
    ties = sum(tie(step.get("gain")) for step in tried)
    noise = f"; {ties} of {len(tried)} steps a tie within noise" if any(step.get("gain") for step in tried) else ""
    gain = (difference(soup.outcome, first.outcome) if soup.outcome is not None and first.outcome is not None
            and len(soup.kept) > 1 else None)
    total = f"; gain over {shown(labels[steps[0]['candidate']])}: {describe_difference(gain, p=False)}" if gain else ""
    console.print(f"  {label}: start from {said(steps[:1])} on {split}; [green]kept[/] "
                  f"{said([s for s in tried if s['kept']])}; [red]left out[/] "
                  f"{said([s for s in tried if not s['kept']])}{noise}{total}")


def ensemble_top1(logits: list[torch.Tensor], targets: torch.Tensor) -> float:
    """Top-1 of the mean of logits: the ensemble a soup of these members would approach."""
    return (torch.stack(logits).mean(0).argmax(1) == targets).double().mean().item()


def guided_order(soup_logits: list[torch.Tensor], pool: list[Ranked],
                 targets: torch.Tensor) -> list[tuple[float, Ranked]]:
    """The candidates by the accuracy of the logit ensemble of the soup's members and each candidate, best
    first (ties: the ranking's order): no weights are scored for it, the logits are each computed once."""
    promise = [(ensemble_top1(soup_logits + [item.logits], targets), item) for item in pool]
    return sorted(promise, key=lambda pair: -pair[0])
