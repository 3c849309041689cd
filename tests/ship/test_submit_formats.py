"""Submission formats (issue 32): one writer per name in soup.ship.submit.FORMATS; `soup submit --format`
picks one (default today's Id,Category CSV), an unknown name is one line listing the choices, and a format
registered by a newcomer is written, recorded and checked like the CSV."""

import hashlib
import json

import pytest
from click.testing import CliRunner

from soup.cli import cli
from soup.models.checkpoint import read_checkpoint
from soup.ship import submit as submit_module
from soup.ship.submit import (DEFAULT_FORMAT, FORMATS, pair_problem, submission_format, submission_writer,
                              write_submission_pair)

from conftest import ingredient_path, one_error_line, run_study, tiny_recipe


def toy_lines(ids: list[str], categories: list[int], classes: list[str]) -> bytes:
    """A toy format: one `id<TAB>class name` line per image."""
    return "".join(f"{i}\t{classes[c]}\n" for i, c in zip(ids, categories)).encode()


@pytest.fixture
def toy_format(monkeypatch):
    monkeypatch.setattr(submit_module, "FORMATS", dict(FORMATS))  # the registration ends with the test
    submission_format("toy")(toy_lines)
    return "toy"


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_sketch_root):
    work = tmp_path_factory.mktemp("formats")
    run_study(work, tiny_recipe(small_sketch_root))
    return work


def test_the_default_format_is_the_kaggle_csv_byte_for_byte():
    assert DEFAULT_FORMAT == "csv" and list(FORMATS) == ["csv"]
    written = submission_writer("csv")(["a.jpg", "b.png"], [3, 0], ["x", "y", "z", "w"])
    assert written == b"Id,Category\r\na.jpg,3\r\nb.png,0\r\n"


def test_a_registered_format_is_written_with_its_provenance(tmp_path, toy_format):
    out = tmp_path / "sub.tsv"
    sidecar = write_submission_pair(out, ["a.jpg", "b.png"], [1, 0], {"kind": "ingredient"}, ["cat", "dog"],
                                    toy_format)
    assert out.read_bytes() == b"a.jpg\tdog\nb.png\tcat\n"
    provenance = json.loads(sidecar.read_text())
    assert provenance["format"] == "toy"
    assert provenance["csv_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert pair_problem(out) is None


def test_an_unknown_format_is_one_line_naming_the_choices_before_any_work(tmp_path, toy_format):
    result = CliRunner().invoke(cli, ["submit", str(tmp_path / "missing.safetensors"), "--format", "parquet"])
    one_error_line(result, "--format 'parquet' is not a submission format", "choose one of: csv, toy")


def test_submit_writes_the_format_it_is_asked_for(work, tmp_path, small_sketch_root, toy_format):
    runner, ckpt = CliRunner(), str(ingredient_path(work))
    csv_out, toy_out = tmp_path / "sub.csv", tmp_path / "sub.tsv"
    result = runner.invoke(cli, ["submit", ckpt, "--data", str(small_sketch_root), "-o", str(csv_out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["submit", ckpt, "--data", str(small_sketch_root), "-o", str(toy_out),
                                 "--format", "toy"])
    assert result.exit_code == 0, result.output
    header, *rows = csv_out.read_text().splitlines()
    assert header == "Id,Category" and rows
    classes = read_checkpoint(ckpt).classes
    expected = [f"{row.split(',')[0]}\t{classes[int(row.split(',')[1])]}" for row in rows]
    assert toy_out.read_text().splitlines() == expected
    assert json.loads((tmp_path / "sub.tsv.json").read_text())["format"] == "toy"
