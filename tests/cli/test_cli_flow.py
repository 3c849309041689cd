"""The user's path through the CLI: train -> cook -> eval -> submit, and the demo, via CliRunner."""

import csv
import json
import os
import re

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from soup.cli import base as cli_base, cli
from soup.models.checkpoint import find_checkpoints, read_checkpoint
from soup.score.evaluator import Evaluator
from soup.train import logs

from conftest import CLASSES, tiny_recipe


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_sketch_root):
    """A working folder where `soup train` has made three ingredients under checkpoints/."""
    work = tmp_path_factory.mktemp("work")
    recipe = tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1, 2]})
    (work / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    old = os.getcwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(cli, ["train", "tiny.yaml"])
        assert result.exit_code == 0, result.output
        assert "val acc" in result.output
        yield work
    finally:
        os.chdir(old)


@pytest.fixture
def runner(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return CliRunner()


def test_train_wrote_one_checkpoint_per_ingredient(workdir):
    paths = sorted((workdir / "checkpoints" / "tiny").glob("*/model.safetensors"))
    assert [p.parent.name for p in paths] == ["00-seed0", "01-seed1", "02-seed2"]


def test_train_single_ingredient_and_out(runner, workdir):
    result = runner.invoke(cli, ["train", "tiny.yaml", "--ingredient", "1", "--out", "elsewhere"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (workdir / "elsewhere" / "tiny").iterdir() if p.is_dir()] == ["01-seed1"]
    assert (workdir / "elsewhere" / "tiny" / "summary.csv").is_file()


def test_cook_greedy_then_eval_then_submit(runner, workdir, small_sketch_root):
    result = runner.invoke(cli, ["cook", "--greedy"])
    assert result.exit_code == 0, result.output
    assert "greedy: start from" in result.output and "(the selection set)" in result.output
    soup_path = workdir / "checkpoints" / "soups" / "greedy.safetensors"
    soup = read_checkpoint(soup_path)
    assert soup.kind == "greedy" and soup.meta["selection"]["split"] == "val"

    result = runner.invoke(cli, ["cook", "--no-eval", "-o", "plain.safetensors"])  # uniform is the default
    assert result.exit_code == 0, result.output
    assert read_checkpoint(workdir / "plain.safetensors").kind == "uniform"
    result = runner.invoke(cli, ["cook", "--uniform", "--no-eval"])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(workdir / "checkpoints" / "soups" / "uniform.safetensors").meta["selection"] is None

    result = runner.invoke(cli, ["eval", "--ensemble"])
    assert result.exit_code == 0, result.output
    assert "greedy" in result.output and "ensemble" in result.output and "*" in result.output
    assert "the set that selected this soup" in result.output

    result = runner.invoke(cli, ["eval", "--json"])
    rows = json.loads(result.output)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("ingredient") == 3 and "greedy" in kinds and "uniform" in kinds
    greedy_row = next(r for r in rows if r["kind"] == "greedy")
    assert greedy_row["selection_set"] is True and greedy_row["top1"] == pytest.approx(soup.meta["selection"]["top1"])
    best = max(r["top1"] for r in rows if r["kind"] == "ingredient")
    assert greedy_row["top1"] >= best  # on the selection set, by construction

    result = runner.invoke(cli, ["submit", str(soup_path), "-o", "sub.csv"])
    assert result.exit_code == 0, result.output
    with open(workdir / "sub.csv", newline="") as f:
        rows = list(csv.reader(f))
    test_files = sorted(p.stem for p in (small_sketch_root / "test_images" / "mistery_category").iterdir())
    assert rows[0] == ["Id", "Category"]
    assert [r[0] for r in rows[1:]] == test_files
    assert all(r[1].isdigit() and 0 <= int(r[1]) < len(CLASSES) for r in rows[1:])


def test_submit_accepts_any_image_extension(runner, workdir, tmp_path, small_sketch_root):
    import shutil

    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(small_sketch_root, root)
    Image.new("L", (40, 30), 255).save(root / "test_images" / "mistery_category" / "img_99999.png")
    (root / "test_images" / "mistery_category" / "notes.txt").write_text("not an image")
    ingredient = next((workdir / "checkpoints" / "tiny").glob("*/model.safetensors"))
    result = runner.invoke(cli, ["submit", str(ingredient), "--data", str(root), "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 0, result.output
    ids = [line.split(",")[0] for line in (tmp_path / "s.csv").read_text().splitlines()[1:]]
    assert "img_99999" in ids and "notes" not in ids


@pytest.mark.parametrize("args,message", [
    (["cook", "nowhere"], "nowhere: no such checkpoint file or folder"),
    (["submit", "missing.safetensors"], "missing.safetensors: no such checkpoint file"),
    (["eval", "tiny.yaml"], "not a readable safetensors file"),
    (["submit", "checkpoints/tiny/00-seed0/model.safetensors", "--data", "nodata"], "test_images/mistery_category: no such folder"),
])
def test_user_mistakes_are_one_line(runner, args, message):
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_demo_end_to_end_small(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "SummaryWriter", None)  # as after `pip install .`: no tensorboard extra
    monkeypatch.setattr(cli_base, "console", Console(width=80, highlight=False))
    monkeypatch.chdir(tmp_path)  # paths as short as a user's: `soup demo` writes under ./soup_demo
    result = CliRunner().invoke(cli, ["demo", "--out", "demo", "--small"])
    assert result.exit_code == 0, result.output
    # Issue 33: about two screens at 80 columns (366 lines before), no ingredient name wrapped over two
    # lines, no bar or colour in output that is not a terminal, and the run ends on what it found.
    lines = result.output.splitlines()
    ids = [c.meta["id"] for c in find_checkpoints([tmp_path / "demo" / "checkpoints" / "sketch_soup"])]
    assert len(lines) <= 100 and "\x1b[" not in result.output, result.output
    assert [line for line in lines for id_ in ids if id_[:6] in line and id_ not in line] == []
    found = next(i for i, line in enumerate(lines) if "what the demo found" in line)
    assert len(lines) - found <= 8 and lines[found + 1].startswith("best ingredient: ")
    assert lines[-1].startswith("wrote ") and "submission.csv" in lines[-1], lines[-8:]
    assert (tmp_path / "demo" / "submission.csv").read_text().startswith("Id,Category\n")
    # Issue 26: the picture the README promises, and TensorBoard's notice once for the demo's three trainings.
    assert (tmp_path / "demo" / "soups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no picture" not in result.output
    assert result.output.count("TensorBoard is not installed") == 1, result.output
    assert "refused, as it should be" in result.output
    # Issue 33: the mission's path, the shipped ViT's frozen prefix cached for the ingredients and the regime said.
    said = " ".join(result.output.split())
    assert "data path: prefix cache: 4 blocks" in said and "training runs blocks 4-5 + head" in said, said
    assert "the glyph ViT soup ships" in said and "600 procedural glyph classes" in said
    assert "probed start probe-" in said and said.count("probed start probe-") == 1
    greedy = read_checkpoint(tmp_path / "demo" / "checkpoints" / "soups" / "greedy.safetensors")
    ingredient_scores = [s["top1"] for s in greedy.meta["steps"]]
    assert greedy.meta["selection"]["split"] == "holdout"
    assert greedy.meta["selection"]["top1"] >= max(ingredient_scores[:1])
    for method in ("learned", "stock", "interpolate"):  # the demo's table shows every soup method
        soup = read_checkpoint(tmp_path / "demo" / "checkpoints" / "soups" / f"{method}.safetensors")
        assert soup.kind == method and soup.meta["selection"]["split"] == "holdout"
    assert "other start: no soup" in result.output
    # The ingredients come from a random search (issue 12): each records its drawn lr, weight decay and seed.
    drawn = [c.meta["settings"] for c in find_checkpoints([tmp_path / "demo" / "checkpoints" / "sketch_soup"],
                                                          kinds={"ingredient"})]
    assert len(drawn) == 2 and all(set(d) == {"train.lr", "train.seed", "train.weight_decay", "train.label_smoothing"}
                                   for d in drawn)
    assert len({d["train.lr"] for d in drawn}) == 2
    # Issue 19: one line says whether the greedy soup beats the best ingredient on val, recomputed here.
    said = " ".join(result.output.split())
    match = re.search(r"greedy soup vs the best ingredient on val \(.*?\): ([+-]\d+\.\d\d) points \(95% CI "
                      r"([+-]\d+\.\d\d) to ([+-]\d+\.\d\d)\), McNemar p=\S+: (.*?)(?: ─|$)", said)
    assert match, said[-2000:]
    ingredients = find_checkpoints([tmp_path / "demo" / "checkpoints" / "sketch_soup"], kinds={"ingredient"})
    val = Evaluator("val")
    best = max(val(c)["top1"] for c in ingredients)
    assert float(match.group(1)) == pytest.approx(round((val(greedy)["top1"] - best) * 100, 2), abs=0.006)
    p = re.search(r"McNemar p=(\S+):", match.group(0)).group(1)
    noise = float(match.group(2)) <= 0 <= float(match.group(3)) or p != "<0.001" and float(p) >= 0.05
    assert match.group(4).startswith("a tie within noise") == noise


def test_a_demo_folder_from_another_start_is_refused(tmp_path):
    """Ingredients fine-tuned from an earlier shipped start must not mix with this one's on a rerun."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"small": True, "ingredients": "search", "data": "distorted16",
                                               "start": "glyph vit"}) + "\n")
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--small"])
    assert result.exit_code == 2 and "holds a demo of another size or version" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (out / "checkpoints").exists()
