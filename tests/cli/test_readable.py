"""Issue 33, "what a newcomer reads": at 80 columns `soup train`, `cook` and `eval` of a 12-ingredient search
fit a screen or so, name the ingredients by short ids with their settings in a legend, and never wrap a
long name over two lines; a loop prints one line when it ends, not one per step. (The demo's own budget is
checked in tests/cli/test_cli_flow.py.)"""

from __future__ import annotations

import re

import yaml
from rich.console import Console

import soup.cli.base
from soup.demo import SEARCH_SPACE
from soup.models.checkpoint import find_checkpoints
from soup.text import legend, one_notice_each, print_legend, short_names
from soup.cli import cli
from click.testing import CliRunner

from conftest import tiny_recipe

WIDTH = 80


def unwrapped(output: str, ids: list[str]) -> list[str]:
    """The lines where an ingredient id starts but is cut: a wrapped (or folded) name."""
    return [line for line in output.splitlines() for id_ in ids if id_[:6] in line and id_ not in line]


def run(args, monkeypatch):
    monkeypatch.setattr(soup.cli.base, "console", Console(width=WIDTH, highlight=False))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output  # no bar or colour in output that is not a terminal
    return result.output


def test_a_twelve_ingredient_search_reads_at_80_columns(small_sketch_root, tmp_path, monkeypatch):
    recipe = tiny_recipe(small_sketch_root, name="sketch_search",
                         search={"trials": 12, "seed": 0, "space": SEARCH_SPACE})
    recipe["data"]["holdout"] = 0.25
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)

    trained = run(["train", "r.yaml"], monkeypatch)
    ingredients = find_checkpoints(["checkpoints/sketch_search"], kinds={"ingredient"})
    ids = [c.meta["id"] for c in ingredients]
    assert len(ids) == 12 and all(len(id_) > 30 for id_ in ids)  # as long as the demo's
    assert unwrapped(trained, ids) == []
    # One line per finished ingredient, none per epoch; the set-up said once for all twelve.
    assert [line.split(":")[0].strip() for line in trained.splitlines() if ", 1 epoch, " in line] == ids
    assert trained.count("parameters train") == 1 and "epoch 1/1" not in trained
    assert len(trained.splitlines()) <= 40, trained

    cooked = run(["cook", "--greedy", "--select-on", "holdout"], monkeypatch)
    assert unwrapped(cooked, ids) == []
    assert "ingredient ids: sketch_search/<index>-<settings>" in cooked
    assert all(cooked.count(id_) == 1 for id_ in ids)  # in the legend, once; elsewhere by short id
    ranked = re.search(r"ranked on holdout: (.*?)\n  greedy:", cooked, re.DOTALL).group(1)
    assert sorted(re.findall(r"\b(\d\d)\s+\d+\.\d\d%", ranked)) == [f"{i:02d}" for i in range(12)]
    assert len(cooked.splitlines()) <= 24, cooked

    evaluated = run(["eval", "--ensemble", "checkpoints/sketch_search", "checkpoints/soups"], monkeypatch)
    assert unwrapped(evaluated, ids) == []
    rows = [line.split()[0] for line in evaluated.splitlines() if re.match(r"^\d\d\s+\d+\.\d\d%", line)]
    assert sorted(rows) == [f"{i:02d}" for i in range(12)]
    assert "ensemble (mean of logits)" in evaluated and all(evaluated.count(id_) == 1 for id_ in ids)
    assert len(evaluated.splitlines()) <= 35, evaluated


def test_short_ids_only_where_they_tell_the_names_apart():
    names = ["sweep/00-lr0.001-seed1", "sweep/01-lr0.002-seed2", "greedy", "tiny/00"]
    assert short_names(names) == {"sweep/00-lr0.001-seed1": "00", "sweep/01-lr0.002-seed2": "01", "greedy": "greedy",
                                  "tiny/00": "tiny/00"}
    # Two recipes: the recipe stays; alike labels (a copy of one ingredient elsewhere): every name stays whole.
    assert short_names(["a/00-lr1", "b/00-lr2"]) == {"a/00-lr1": "a/00", "b/00-lr2": "b/00"}
    assert short_names(["a/00-lr1", "a/00-lr2"]) == {"a/00-lr1": "a/00-lr1", "a/00-lr2": "a/00-lr2"}
    assert legend(names) == ("ingredient ids: sweep/<index>-<settings>",
                             {"sweep/00-lr0.001-seed1": "00-lr0.001-seed1", "sweep/01-lr0.002-seed2": "01-lr0.002-seed2"})
    console = Console(width=80, record=True)
    with one_notice_each():  # once per command: a second table of the same ingredients repeats no legend
        print_legend(names, console)
        print_legend(names, console)
    assert console.export_text().count("00-lr0.001-seed1") == 1
