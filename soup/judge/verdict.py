"""`soup cook --best`'s closing verdict: every method's cross-fitted predictions (soup.cook.crossfit) beside
the ingredient the split picks, cross-fitted the same way, and the ensemble of the ingredients, with paired Δ
and McNemar p against each. Every row predicts each image with a model that was not chosen on it, so the
comparison is honest on either selection split."""

from __future__ import annotations

from rich.console import Console

from soup.cook.crossfit import Compared
from soup.judge.evaluate import score_row
from soup.judge.report import add_statistics, print_eval_table
from soup.score import stats
from soup.score.evaluator import Predictions
from soup.text import shown


class BestVerdict:
    """Collects the comparison's rows (`soup.cook.best.cook_best`'s `on_candidate`) as they come, so that no
    candidate's weights need to outlive its turn, then prints the tables."""

    def __init__(self):
        self.rows: list[tuple[dict, Predictions]] = []
        self.where = ""

    def __call__(self, row: Compared) -> None:
        self.where = self.where or row.where
        self.rows.append(score_row(row.logits, row.targets, row.classes, name=row.name, path="", kind=row.kind,
                                   members=row.members, split=row.split, selection_set=False,
                                   temperature=1.0))

    def report(self, winner: str, console: Console, resamples: int = stats.RESAMPLES) -> dict:
        """Print the methods against the ingredient the split picks, then against the ensemble; returns both
        tables' rows (keys "ingredient" and "ensemble", where there is an ensemble)."""
        methods = [(dict(row), outcome) for row, outcome in self.rows if row["kind"] == "soup"]
        for row, _ in methods:
            row["name"] = f"{row['name']} (winner)" if row["name"] == winner else row["name"]
        console.print(f"the comparison, on {self.where}: no row was chosen on the images it is scored on")
        tables = {}
        for ref in ("ingredient", "ensemble"):
            reference = [(dict(row), outcome) for row, outcome in self.rows if row["kind"] == ref]
            if not reference:
                continue
            rows = add_statistics(methods + reference, resamples, compare=reference[0][0]["name"])
            print_eval_table(rows, reference[0][0]["split"], console,
                             title=f"--best: each method against {shown(reference[0][0]['name'])}")
            tables[ref] = rows
        return tables
