"""Issue 26, item 17: the README's first command (`pip install . && soup demo`) shows everything: matplotlib is
a core dependency (the demo's soups.png, soup plot, soup report's plots), and a notice that something
optional is off (TensorBoard) is said once per command, not once per ingredient or recipe trained."""

import re
import tomllib
from pathlib import Path

import yaml
from click.testing import CliRunner

from soup.cli import cli
from soup.text import first_time, one_notice_each
from soup.train import logs

from conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
OFF = "logs: TensorBoard is not installed"


def test_matplotlib_is_a_core_dependency_and_the_readme_installs_the_core():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower() for dep in project["dependencies"]]
    assert "matplotlib" in names
    # The optional integrations stay optional: the core runs without them.
    assert not {"tensorboard", "huggingface_hub", "huggingface-hub"} & set(names)
    # `soup[plot]` still installs (an empty alias), so older instructions keep working.
    assert project["optional-dependencies"]["plot"] == []
    assert "pip install . && soup demo" in (ROOT / "README.md").read_text()


def test_a_sweep_says_tensorboard_is_off_once_per_command(small_sketch_root, tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "SummaryWriter", None)  # as if tensorboard were not importable
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(small_sketch_root,
                                                                sweep={"train.seed": [0, 1, 2]})))
    monkeypatch.chdir(tmp_path)
    for out in ("a", "b"):  # each command says it once, also the second in one process
        result = CliRunner().invoke(cli, ["train", "r.yaml", "--out", out])
        assert result.exit_code == 0, result.output
        assert len(list((tmp_path / out / "tiny").glob("*/model.safetensors"))) == 3
        said = " ".join(result.output.split())  # the console wraps long lines
        assert said.count(OFF) == 1 and said.count("pip install 'soup[tensorboard]' turns them on") == 1, said
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_notices_are_once_per_scope_and_each_call_outside_one():
    assert first_time("x") and first_time("x")  # a library call outside any command says its own
    with one_notice_each():
        assert first_time("x") and not first_time("x") and first_time("y")
        with one_notice_each():  # the demo inside the CLI: the outer command's notices count
            assert not first_time("x")
    with one_notice_each():
        assert first_time("x")

