"""How `soup cook --best` compares methods on data none of them selected on: cross-fitting on two halves of
the selection split. The split is cut in two (seeded, stratified by class); every method cooks on one half
and its soup predicts the other half, then the other way round, so each image of the split is predicted by a
soup whose choices never saw it. A method's figure is the accuracy of those predictions over the whole split.

Picking the winner on the split a greedy or learned soup was fitted on favours the method that fits that
split hardest (greedy, on 4 val images a class, looked +1.7 there and was -0.7 on unseen images, issue 33);
cross-fitting scores each choice on images it did not see. The ingredient the split picks is cross-fitted
the same way (the best on one half predicts the other), so the figures compare like with like; the ensemble
of every ingredient chooses nothing and is scored on the whole split as it is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from rich.console import Console

from soup.cook.methods import Soup
from soup.cook.selector import Selector
from soup.errors import SoupError
from soup.models.checkpoint import Checkpoint

HALVES_SEED = 0  # fixed: the same split always gets the same halves, whatever the training seeds


@dataclass
class Halves:
    """Two halves of the selection split: positions in its image order, each sorted."""

    split: str
    first: list[int]
    second: list[int]
    seed: int = HALVES_SEED

    @property
    def parts(self) -> list[list[int]]:
        return [self.first, self.second]

    def folds(self) -> list[tuple[int, int]]:
        """(the half a method chooses on, the half its soup is scored on), both ways round."""
        return [(0, 1), (1, 0)]

    def name(self, part: int) -> str:
        return f"{self.split} half {part + 1}"

    def record(self) -> dict:
        return {"protocol": "cross-fit on two halves", "split": self.split, "seed": self.seed,
                "first": self.first, "second": self.second}


def halves(targets: list[int], split: str, seed: int = HALVES_SEED) -> Halves:
    """Each class's images in a seeded random order, dealt alternately to the halves; a class with an odd
    count gives its extra image to the half that is smaller so far, so the halves differ by at most one."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, target in enumerate(targets):
        by_class[target].append(position)
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for target in sorted(by_class):
        members = by_class[target]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        larger, smaller = (first, second) if len(first) <= len(second) else (second, first)
        larger += order[0::2]
        smaller += order[1::2]
    if not first or not second:
        raise SoupError(f"--best compares methods by cross-fitting on two halves of {split}, which holds "
                        f"{len(targets)} image{'s' * (len(targets) != 1)}; it needs at least 2")
    return Halves(split, sorted(first), sorted(second), seed)


@dataclass
class Compared:
    """One row of the comparison: logits for every image of the split, each from a model that was not
    chosen on that image, with what chose it on each half."""

    name: str
    kind: str  # "soup" (a method), "ingredient" (the one the split picks) or "ensemble"
    logits: torch.Tensor
    targets: list[int]
    classes: list[str]
    split: str
    where: str  # which data compared it, in words
    members: int = 1
    folds: list[dict] = field(default_factory=list)

    @property
    def top1(self) -> float:
        return (self.logits.argmax(1) == torch.as_tensor(self.targets)).double().mean().item()


def fold_selectors(select: Selector, split: Halves) -> list[Selector]:
    """One selector per half, sharing the full selector's BatchNorm reset."""
    evaluator = select.evaluator
    return [Selector(select.template, evaluator.split, evaluator.root, select.device, batch_size=evaluator.batch_size,
                     num_workers=evaluator.num_workers, use_cache=evaluator.use_cache, reset=select.reset,
                     subset=positions, label=split.name(part))
            for part, positions in enumerate(split.parts)]


def cross_fitted(method: str, cook_on: Callable[[Selector], Soup], split: Halves, selectors: list[Selector],
                 targets: list[int], classes: list[str], console: Console) -> Compared:
    """`cook_on(selector)` on each half, its soup's logits on the other half, put together."""
    logits, folds, said = None, [], []
    for chosen_on, scored_on in split.folds():
        soup = cook_on(selectors[chosen_on])
        part, _ = selectors[scored_on].logits(soup.state_dict)
        positions = split.parts[scored_on]
        if logits is None:
            logits = torch.empty(len(targets), part.shape[1], dtype=part.dtype)
        logits[positions] = part
        correct = int((part.argmax(1) == torch.as_tensor([targets[i] for i in positions])).sum())
        folds.append({"chosen_on": split.name(chosen_on), "scored_on": split.name(scored_on),
                      "members": [[c.name, w] for c, w in soup.members], "correct": correct,
                      "images": len(positions)})
        said.append(f"on {split.name(chosen_on)} -> {correct / len(positions):.2%} on the other")
    row = Compared(method, "soup", logits, targets, classes, split.split, where(split), len(folds[0]["members"]), folds)
    console.print(f"  best: {method} cooked {'; '.join(said)}: {row.top1:.2%} cross-fitted")
    return row


def where(split: Halves) -> str:
    return (f"{split.split} cross-fitted (each half chooses for the other: {len(split.first)} + "
            f"{len(split.second)} images, seed {split.seed}, stratified by class)")


def references(ingredients: list[Checkpoint], ingredient_logits: list[torch.Tensor], split: Halves,
               targets: list[int]) -> list[Compared]:
    """The ingredient the split picks, cross-fitted (the best on one half predicts the other; ties: the
    first listed), and the logit ensemble of every ingredient, which chooses nothing."""
    truth = torch.as_tensor(targets)
    logits, folds = torch.empty_like(ingredient_logits[0]), []
    for chosen_on, scored_on in split.folds():
        chosen, scored = split.parts[chosen_on], split.parts[scored_on]
        accuracy = [(lg[chosen].argmax(1) == truth[chosen]).double().mean().item() for lg in ingredient_logits]
        best = max(range(len(ingredients)), key=lambda i: (accuracy[i], -i))
        logits[scored] = ingredient_logits[best][scored]
        folds.append({"chosen_on": split.name(chosen_on), "scored_on": split.name(scored_on),
                      "members": [[ingredients[best].name, 1.0]]})
    classes = ingredients[0].classes
    picked = Compared(f"the ingredient {split.split} picks", "ingredient", logits, targets, classes, split.split,
                      where(split), folds=folds)
    ensemble = Compared("ensemble (mean of logits)", "ensemble", torch.stack(ingredient_logits).mean(0), targets,
                        classes, split.split, f"the whole of {split.split} (it chooses nothing)", len(ingredients))
    return [picked] + ([ensemble] if len(ingredients) >= 2 else [])
