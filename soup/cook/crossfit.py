"""How `soup cook --best` compares methods on data none of them selected on: cross-fitting on K parts of the
selection split (4 by default). The split is cut in K (seeded, stratified by class); every method
cooks on all parts but one and its soup predicts that one, for each part in turn, so each image of the split
is predicted by a soup whose choices never saw it. A method's figure is the accuracy of those predictions
over the whole split.

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

FOLDS_SEED = 0  # fixed: the same split always gets the same parts, whatever the training seeds
# Chosen on benchmarks/best_protocol.py's studies (seeds of their own, 4 val images a class; docs/cooking.md):
# 4 parts never picked a soup below the val-picked ingredient on test, 2 halves and same-split picking did.
DEFAULT_FOLDS = 4


@dataclass
class Folds:
    """The selection split cut in `k` parts: positions in its image order, each part sorted. Fold i
    chooses on every part but part i and is scored on part i."""

    split: str
    parts: list[list[int]]
    seed: int = FOLDS_SEED

    def chosen_on(self, part: int) -> list[int]:
        return sorted(i for j, other in enumerate(self.parts) if j != part for i in other)

    def name(self, part: int) -> str:
        k = len(self.parts)
        return f"{self.split} half {part + 1}" if k == 2 else f"{self.split} part {part + 1} of {k}"

    def rest(self, part: int) -> str:
        """What fold `part` chooses on, in words."""
        return self.name(1 - part) if len(self.parts) == 2 else f"{self.split} but part {part + 1}"

    def record(self) -> dict:
        return {"protocol": f"cross-fit on {len(self.parts)} parts", "split": self.split, "seed": self.seed,
                "parts": self.parts}


def folds(targets: list[int], split: str, k: int = DEFAULT_FOLDS, seed: int = FOLDS_SEED) -> Folds:
    """Each class's images in a seeded random order, dealt round the parts starting from the part that is
    smallest so far, so that every class is spread evenly and the parts differ by at most one image."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for position, target in enumerate(targets):
        by_class[target].append(position)
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in range(k)]
    for target in sorted(by_class):
        members = by_class[target]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        by_size = sorted(range(k), key=lambda j: len(parts[j]))  # stable: ties keep the part order
        for n, position in enumerate(order):
            parts[by_size[n % k]].append(position)
    if not all(parts):
        raise SoupError(f"--best compares methods by cross-fitting on {k} parts of {split}, which holds "
                        f"{len(targets)} image{'s' * (len(targets) != 1)}; it needs at least {k}"
                        + (" (or fewer --folds)" if k > 2 else ""))
    return Folds(split, [sorted(part) for part in parts], seed)


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


def fold_selectors(select: Selector, split: Folds) -> list[tuple[Selector, Selector]]:
    """Per fold (chooser, scorer): one selector on what it chooses on, one on its part, all sharing the full
    selector's BatchNorm reset."""
    evaluator = select.evaluator

    def on(positions: list[int], label: str) -> Selector:
        return Selector(select.template, evaluator.split, evaluator.root, select.device,
                        batch_size=evaluator.batch_size, num_workers=evaluator.num_workers,
                        use_cache=evaluator.use_cache, reset=select.reset, subset=positions, label=label)

    return [(on(split.chosen_on(part), split.rest(part)), on(positions, split.name(part)))
            for part, positions in enumerate(split.parts)]


def cross_fitted(method: str, cook_on: Callable[[Selector], Soup], split: Folds,
                 selectors: list[tuple[Selector, Selector]], targets: list[int], classes: list[str],
                 console: Console) -> Compared:
    """`cook_on(selector)` on all but each part, its soup's logits on that part, put together."""
    logits, records, said = None, [], []
    for scored_on, (chooser, scorer) in enumerate(selectors):
        soup = cook_on(chooser)
        part, _ = scorer.logits(soup.state_dict)
        positions = split.parts[scored_on]
        if logits is None:
            logits = torch.empty(len(targets), part.shape[1], dtype=part.dtype)
        logits[positions] = part
        correct = int((part.argmax(1) == torch.as_tensor([targets[i] for i in positions])).sum())
        records.append({"chosen_on": split.rest(scored_on), "scored_on": split.name(scored_on),
                        "members": [[c.name, w] for c, w in soup.members], "correct": correct,
                        "images": len(positions)})
        said.append(f"{correct / len(positions):.0%} on {split.name(scored_on)}")
    row = Compared(method, "soup", logits, targets, classes, split.split, where(split), len(records[0]["members"]),
                   records)
    console.print(f"  best: {method}: {', '.join(said)} (each cooked on the rest): {row.top1:.2%} cross-fitted")
    return row


def where(split: Folds) -> str:
    sizes = " + ".join(str(len(part)) for part in split.parts)
    how = ("each half chooses for the other" if len(split.parts) == 2 else
           f"each of {len(split.parts)} parts scored by what the others chose")
    return f"{split.split} cross-fitted ({how}: {sizes} images, seed {split.seed}, stratified by class)"


def references(ingredients: list[Checkpoint], ingredient_logits: list[torch.Tensor], split: Folds,
               targets: list[int]) -> list[Compared]:
    """The ingredient the split picks, cross-fitted (the best on the rest predicts each part; ties: the
    first listed), and the logit ensemble of every ingredient, which chooses nothing."""
    truth = torch.as_tensor(targets)
    logits, records = torch.empty_like(ingredient_logits[0]), []
    for scored_on, scored in enumerate(split.parts):
        chosen = split.chosen_on(scored_on)
        accuracy = [(lg[chosen].argmax(1) == truth[chosen]).double().mean().item() for lg in ingredient_logits]
        best = max(range(len(ingredients)), key=lambda i: (accuracy[i], -i))
        logits[scored] = ingredient_logits[best][scored]
        records.append({"chosen_on": split.rest(scored_on), "scored_on": split.name(scored_on),
                        "members": [[ingredients[best].name, 1.0]]})
    classes = ingredients[0].classes
    picked = Compared(f"the ingredient {split.split} picks", "ingredient", logits, targets, classes, split.split,
                      where(split), folds=records)
    ensemble = Compared("ensemble (mean of logits)", "ensemble", torch.stack(ingredient_logits).mean(0), targets,
                        classes, split.split, f"the whole of {split.split} (it chooses nothing)", len(ingredients))
    return [picked] + ([ensemble] if len(ingredients) >= 2 else [])
