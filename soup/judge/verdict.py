"""`soup cook --best`'s closing verdict: every candidate soup on val beside the ingredient val picks and the
ensemble of the ingredients, with paired Δ and McNemar p against each. Honest only when val took no part
in choosing the winner (--select-on holdout); otherwise the tables say so."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from soup.judge.evaluate import evaluate_rows, score_row
from soup.judge.report import add_statistics, print_eval_table, reference_index
from soup.models.checkpoint import Checkpoint
from soup.score import stats
from soup.score.evaluator import Evaluator, Predictions
from soup.text import shown


class BestVerdict:
    """Collects each candidate soup's predictions on `split` as it is cooked (`soup.cook.best.cook_best`'s
    `on_candidate`), so that no candidate's weights need to outlive its turn, then prints the tables."""

    def __init__(self, ingredients: list[Checkpoint], data_root: str | Path | None = None,
                 device: torch.device | None = None, split: str = "val"):
        self.ingredients, self.split = ingredients, split
        self.evaluator = Evaluator(split, data_root, device)
        self.candidates: list[tuple[dict, Predictions]] = []

    def __call__(self, method: str, soup) -> None:
        template = self.ingredients[0]
        logits, targets = self.evaluator.logits(template, soup.state_dict)
        self.candidates.append(score_row(logits, targets, template.classes, name=method, path="", kind=method,
                                         members=len(soup.members), split=self.split, selection_set=False,
                                         temperature=1.0))

    def report(self, winner: str, select_on: str, console: Console, resamples: int = stats.RESAMPLES) -> dict:
        """Print the candidates against the best ingredient on this split, then against the ensemble; returns
        both tables' rows (keys "ingredient" and "ensemble")."""
        evaluated = evaluate_rows(self.ingredients, self.evaluator, ensemble=len(self.ingredients) >= 2)
        picked = evaluated[reference_index([row for row, _ in evaluated], "best")]
        references = [picked] + [pair for pair in evaluated if pair[0]["kind"] == "ensemble"]
        chosen_here = select_on == self.split
        for row, _ in self.candidates:
            row["selection_set"] = chosen_here
            row["name"] = f"{row['kind']} (winner)" if row["kind"] == winner else row["kind"]
        if chosen_here:
            console.print(f"[yellow]not an honest verdict[/]: {self.split} chose the winner (--select-on "
                          f"{select_on}), so every soup below is measured on the images that picked it; cook "
                          "with --select-on holdout for a verdict on images that took no part in selection.")
        else:
            console.print(f"the verdict, on {self.split}, which took no part in selection (the winner was picked "
                          f"on {select_on}):")
        tables = {}
        for ref, (row, _) in zip(("ingredient", "ensemble"), references):
            rows = add_statistics([(dict(r), o) for r, o in self.candidates + references], resamples,
                                  compare=row["name"])
            what = f"the ingredient {self.split} picks, {row['name']}" if ref == "ingredient" else row["name"]
            print_eval_table(rows, self.split, console, title=f"--best: each method on {self.split} against "
                             f"{shown(what)}")
            tables[ref] = rows
        return tables
