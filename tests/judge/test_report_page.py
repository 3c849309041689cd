"""`soup report` (issue 20): one self-contained HTML page whose numbers are `soup eval --ensemble --json`'s,
which writes without matplotlib, and which a real browser draws without console errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from soup.cli import cli
from soup.errors import SoupError
from soup.judge import page, plot
from soup.judge.report import eval_cells

from conftest import one_error_line, run_study, tiny_recipe


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_sketch_root):
    """Three ingredients (two epochs each, so the history has a line) and a greedy soup under checkpoints/."""
    work = tmp_path_factory.mktemp("study")
    recipe = tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1, 2]}, train={"epochs": 2})
    run_study(work, recipe, ["cook", "--greedy"])
    return work


@pytest.fixture
def runner(study, monkeypatch):
    monkeypatch.chdir(study)
    return CliRunner()


class Page(HTMLParser):
    """Tables (id -> rows of (attributes of the tr, cell texts)), images and missing-plot lines."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.images, self.missing, self.scripts = {}, [], 0, []
        self._table = self._row = self._cell = None
        self._in_missing = self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = (attrs, [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "p" and attrs.get("class") == "missing":
            self.missing += 1
        elif tag == "script":
            self.scripts.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[1].append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _write(runner, *args) -> tuple[str, Page]:
    result = runner.invoke(cli, ["report", *args])
    assert result.exit_code == 0, result.output
    output = args[args.index("-o") + 1] if "-o" in args else "report.html"
    text = open(output, encoding="ascii").read()
    return text, Page(text)


def test_page_numbers_are_soup_eval_json(runner, study):
    text, page = _write(runner, "-o", "page.html")
    rows = json.loads(runner.invoke(cli, ["eval", "--ensemble", "--json"]).output)
    shown = page.tables["eval"][1:]  # the header first
    assert [attrs["data-name"] for attrs, _ in shown] == [row["name"] for row in rows]
    names, cells = eval_cells(rows)
    assert page.tables["eval"][0][1] == ["checkpoint"] + names
    for (attrs, line), row, expected in zip(shown, rows, cells):
        assert line[1:] == expected  # every cell as `soup eval`'s table writes it
        assert float(attrs["data-top1"]) == row["top1"]
        assert float(attrs["data-top1-low"]) == row["top1_low"] and float(attrs["data-top1-high"]) == row["top1_high"]
        if row["compare"] and "diff" in row["compare"]:
            assert float(attrs["data-diff"]) == row["compare"]["diff"]
            assert float(attrs["data-diff-low"]) == row["compare"]["low"]
    assert [r["kind"] for r in rows].count("ensemble") == 1 and "greedy" in [r["kind"] for r in rows]
    assert any(line[names.index("Δ pts") + 1] == "ref" for _, line in shown)  # Δ against the best ingredient
    # One row per ingredient, greedy's steps, inspect's pairs, per-class: all there, all from the same code.
    assert "train.seed:\n- 0\n- 1\n- 2" in text  # the search space, from the ingredients' settings
    assert len(page.tables["ingredients"]) == 4 and len(page.tables["pairs"]) == 4
    assert len(page.tables["greedy"]) == 4 and page.tables["worst"][1:]
    # Self-contained: no external fetch of any kind; every plot embedded.
    assert len(page.images) == 4 and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text) and all("src" not in s for s in page.scripts)


def test_names_from_outside_are_page_text():
    assert page.esc('<img src=x onerror="a()">\u202e') == "&lt;img src=x onerror=&quot;a()&quot;&gt;\\u202e"


def test_page_writes_without_matplotlib(runner, monkeypatch):
    def missing():
        raise SoupError(plot.INSTALL_HINT)

    monkeypatch.setattr(plot, "_figure_class", missing)
    _, page = _write(runner, "-o", "bare.html")
    assert page.images == [] and page.missing == 4
    assert len(page.tables["eval"]) > 1 and len(page.tables["ingredients"]) == 4


def test_page_is_never_written_over_without_overwrite(runner, study):
    _write(runner, "-o", "twice.html")
    one_error_line(runner.invoke(cli, ["report", "-o", "twice.html"]), "exists", "--overwrite")
    _write(runner, "-o", "twice.html", "--overwrite")
    one_error_line(runner.invoke(cli, ["report", "-o", "checkpoints/soups/greedy.safetensors"]), "never replaces")
    one_error_line(runner.invoke(cli, ["report", "-o", "checkpoints/tiny/00-seed0/report.html"]), "soup train")


@pytest.mark.browser
def test_browser_draws_the_page(runner, study, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed: the page is not opened in a browser")
    Image = pytest.importorskip("PIL.Image")
    _write(runner, "-o", "browser.html", "--overwrite")
    url = (study / "browser.html").as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "page.png"
    run = subprocess.run(flags + ["--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                                  "--window-size=1200,3000", url], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "Uncaught" in line or "CONSOLE" in line and "rror" in line]
    assert not errors, errors
    image = Image.open(shot).convert("L")
    dark = sum(count for level, count in enumerate(image.histogram()) if level < 200)
    assert dark > 0.03 * image.width * image.height  # tables and plots drew, not a blank page
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    ingredients = Page(dom).tables["ingredients"]
    assert 'aria-sort="descending"' in dom  # the script ran and sorted by top-1 on load
    top1 = [float(line[2].rstrip("%")) for _, line in ingredients[1:]]
    assert top1 == sorted(top1, reverse=True)
