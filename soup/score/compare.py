"""Comparing two sets of predictions on the same images: the top-1 difference with its paired bootstrap
interval and McNemar p, said in one line; and `soup cook`'s closing verdict, a soup against the best
ingredient on a split that took no part in selection.
"""

from __future__ import annotations


import torch
from rich.console import Console

from soup.errors import SoupError, one_line
from soup.models.checkpoint import Checkpoint
from soup.score import stats
from soup.score.evaluator import Evaluator, Predictions, predictions
from soup.text import short_names, shown


def difference(outcome: Predictions, ref: Predictions, resamples: int = stats.RESAMPLES,
               seed: int = stats.SEED) -> dict:
    """`outcome` minus `ref` on the same images: top-1 difference, paired interval (None without
    resamples) and McNemar p."""
    correct = torch.stack([outcome.correct, ref.correct])
    bounds = stats.intervals(correct, 1, resamples, seed) if resamples > 0 else None
    return {"diff": (correct[0].double().mean() - correct[1].double().mean()).item(),
            "low": bounds["diff_low"][0] if bounds else None, "high": bounds["diff_high"][0] if bounds else None,
            "p": stats.mcnemar(outcome.correct, ref.correct)}


def points(value: float) -> str:
    return f"{value * 100:+.2f}"


def p_value(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def describe_difference(d: dict, p: bool = True) -> str:
    """"+0.40 points (95% CI -0.32 to +1.12), McNemar p=0.310"."""
    interval = f" (95% CI {points(d['low'])} to {points(d['high'])})" if d.get("low") is not None else ""
    return f"{points(d['diff'])} points{interval}" + (f", McNemar p={p_value(d['p'])}" if p else "")


def versus_best(state_dict: dict, best: Checkpoint, split: str, data_root, device, console: Console) -> dict | None:
    """`soup cook`'s closing verdict: the soup (weights `state_dict`) against `best`, the best ingredient
    on the selection split, both measured on `split`, which took no part in selection."""
    evaluator = Evaluator(split, data_root, device)
    try:
        soup_logits, targets = evaluator.logits(best, state_dict)
        soup = predictions(soup_logits, targets, best.classes)
        ingredient = predictions(evaluator.logits(best)[0], targets, best.classes)
    except SoupError as err:
        console.print(f"  no report on {split}: {shown(one_line(err))}")
        return None
    verdict = {"split": split, "ref": best.name, **difference(soup, ingredient)}
    console.print(f"  on {split}, which took no part in selection: soup {soup.correct.double().mean().item():.2%} vs "
                  f"best ingredient {shown(short_names([best.name])[best.name])} {ingredient.correct.double().mean().item():.2%}: "
                  f"{describe_difference(verdict)}")
    return verdict
