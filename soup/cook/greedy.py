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
from soup.text import shown


def judged(select, state_dict: dict) -> tuple[dict, Predictions | None]:
    """Scores and per-image predictions; a bare scoring function (a stand-in selector) has no per-image
    predictions, and then no interval is given."""
    judge = getattr(select, "judged", None)
    return judge(state_dict) if judge else (select(state_dict), None)


@dataclass(eq=False)
class Ranked:
    top1: float
    checkpoint: Checkpoint
    outcome: Predictions | None
    logits: torch.Tensor | None = None  # selection-set logits, kept only where a method asks (guided)


def rank(ingredients: list[Checkpoint], select, console: Console, keep_logits: bool = False) -> list[Ranked]:
    """Every ingredient scored once on the selection set, best first; ties keep the order given."""
    ranked = []
    for checkpoint in ingredients:
        try:
            if keep_logits:
                logits, targets = select.logits(checkpoint.state_dict())
                result, outcome = scores(logits, targets), predictions(logits, targets, checkpoint.classes)
            else:
                (result, outcome), logits = judged(select, checkpoint.state_dict()), None
        except NonFiniteLogits as err:  # the selector knows its template, not which ingredient it scored
            raise err.named(str(checkpoint.path)) from None
        console.print(f"  {shown(checkpoint.name)}: {result['top1']:.2%} on {select.split}")
        ranked.append(Ranked(result["top1"], checkpoint, outcome, logits))
    ranked.sort(key=lambda item: -item.top1)  # stable: ties keep the order given
    return ranked


@dataclass
class Greedy:
    """A greedy soup in the making: its members, its selection accuracy and per-image outcome."""

    kept: list[Checkpoint]
    top1: float
    outcome: Predictions | None
    scored: int = 0  # weight sets scored on the selection set, the ingredients' own included

    def members(self) -> list[tuple[Checkpoint, float]]:
        return [(c, 1.0 / len(self.kept)) for c in self.kept]


def try_candidate(soup: Greedy, candidate: Checkpoint, select, console: Console, label: str = "greedy",
                  extra: dict | None = None) -> dict:
    """The paper's rule: add `candidate` if the uniform average with it scores at least the soup so far
    (`>=`, so a soup never falls below its best ingredient on the selection set). Returns the step."""
    trial = weighted_average([(c, 1.0 / (len(soup.kept) + 1)) for c in soup.kept + [candidate]])
    result, outcome = judged(select, trial)
    soup.scored += 1
    acc = result["top1"]
    keep = acc >= soup.top1
    # The gain over the soup so far on the same images: an interval holding 0 means a tie within noise.
    gain = difference(outcome, soup.outcome) if outcome is not None else None
    step = {"candidate": candidate.name, "top1": acc, "kept": keep, **(extra or {}), **({"gain": gain} if gain else {})}
    verdict = "[green]kept[/]" if keep else "[red]left out[/]"
    noise = " (a tie within noise)" if gain and gain["low"] is not None and gain["low"] <= 0 <= gain["high"] else ""
    said = f", gain {describe_difference(gain, p=False)}" if gain else ""
    console.print(f"  {label}: + {shown(candidate.name)} -> {acc:.2%} on {select.split}{said}: {verdict}{noise}")
    if keep:
        soup.kept.append(candidate)
        soup.top1, soup.outcome = acc, outcome
    return step


def ensemble_top1(logits: list[torch.Tensor], targets: torch.Tensor) -> float:
    """Top-1 of the mean of logits: the ensemble a soup of these members would approach."""
    return (torch.stack(logits).mean(0).argmax(1) == targets).double().mean().item()


def guided_order(soup_logits: list[torch.Tensor], pool: list[Ranked],
                 targets: torch.Tensor) -> list[tuple[float, Ranked]]:
    """The candidates by the accuracy of the logit ensemble of the soup's members and each candidate, best
    first (ties: the ranking's order): no weights are scored for it, the logits are each computed once."""
    promise = [(ensemble_top1(soup_logits + [item.logits], targets), item) for item in pool]
    return sorted(promise, key=lambda pair: -pair[0])
