"""Hostile and careless cases of shipping (issue 26): an export killed mid-swap, the Hub unreachable or
refusing, a submission killed between its two files, side logs that cannot be written, odd names in
pictures, cards and CSV files read by people."""

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import soup.ship.export as export_module
from soup.cli import cli
from soup.errors import SoupError
from soup.models.checkpoint import read_checkpoint, rewrite_metadata
from soup.train.logs import write_summary

from conftest import ingredient_path, invoke_with_console, one_error_line, run_study, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_sketch_root):
    """Two tiny ResNet ingredients under <work>/checkpoints/tiny/, and one export of each (the references a
    killed export is compared with)."""
    work = tmp_path_factory.mktemp("ship")
    run_study(work, tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1]}))
    for index in (0, 1):
        result = CliRunner().invoke(cli, ["export", str(ingredient_path(work, index)), str(work / f"ref{index}")])
        assert result.exit_code == 0, result.output
    return work


def export_files(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in export_module.EXPORT_FILES if (folder / name).is_file()}


# Item 2: an export is all or nothing -------------------------------------------------------------------

KILLED_EXPORT = """
import os, signal, sys
import soup.ship.export as export
point, exchange = sys.argv[1], sys.argv[2]
def kill(*args):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "writing config.json":  # no hook: the weights are written, the config writer never returns
    writers = export._writers
    export._writers = lambda e: {**writers(e), "config.json": kill}
else:
    import soup.ship.staging as staging
    staging._reached = lambda where: kill() if where == point else None
    if exchange == "no-exchange":
        staging._exchange = lambda a, b: False
from soup.cli import cli
cli(sys.argv[3:])
"""


def killed_export(study, out, point, exchange="exchange"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLED_EXPORT, point, exchange, "export",
                           str(ingredient_path(study, 1)), str(out), "--overwrite"], env=env, cwd=study,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr


@pytest.mark.parametrize("point", ["writing config.json", "linked others", "wrote model.safetensors",
                                   "wrote config.json", "swapped"])
def test_a_killed_overwrite_leaves_the_old_export_or_the_new_one_whole(study, tmp_path, point):
    old, new = export_files(study / "ref0"), export_files(study / "ref1")
    assert old != new and set(old) == set(export_module.EXPORT_FILES)
    out = tmp_path / "out"
    out.mkdir()
    for name, data in old.items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("mine")
    killed_export(study, out, point)
    assert export_files(out) in (old, new)  # never new weights beside the old config and card
    assert (out / "notes.txt").read_text() == "mine"
    # The next export puts right what the kill left (.out.<random>.tmp) and says so.
    result = CliRunner().invoke(cli, ["export", str(ingredient_path(study, 1)), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "interrupted export" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert export_files(out) == new and (out / "notes.txt").read_text() == "mine"


def test_a_kill_between_the_two_renames_is_put_right_by_the_next_export(study, tmp_path):
    """Where the file system cannot exchange two names, the old folder moves away and the new one in: a kill
    between them leaves both whole beside a missing DIR, which the next export puts back before its checks."""
    out = tmp_path / "out"
    out.mkdir()
    for name, data in export_files(study / "ref0").items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("mine")
    killed_export(study, out, "moved away", "no-exchange")
    assert not out.exists() and len(list(tmp_path.iterdir())) == 2
    result = CliRunner().invoke(cli, ["export", str(ingredient_path(study, 0)), str(out)])
    one_error_line(result, "exists and is not empty", "--overwrite")  # DIR is back: nothing replaced unasked
    assert export_files(out) == export_files(study / "ref1") and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# Items 3 and 4: --push, the Hub unreachable or refusing ----------------------------------------------------

def fake_hub(monkeypatch, error):
    """huggingface_hub's HfApi replaced by one whose upload raises `error`; the calls it got."""
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"]))
            raise error

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(export_module.huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(export_module.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return calls


def hub_client():
    """The HTTP client huggingface_hub uses (httpx2 from its 2.x, httpx before)."""
    pytest.importorskip("huggingface_hub")
    try:
        import httpx2 as client
    except ImportError:
        import httpx as client
    return client


@pytest.mark.parametrize("error", ["ConnectError", "ConnectTimeout", "ProxyError"])
def test_push_with_the_hub_unreachable_is_one_line(study, tmp_path, monkeypatch, error):
    client = hub_client()
    request = client.Request("POST", "https://huggingface.co/api/models/someone/tiny-soup/commit/main")
    calls = fake_hub(monkeypatch, getattr(client, error)("[Errno -3] Temporary failure in name resolution",
                                                         request=request))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(ingredient_path(study)), str(out), "--push", "someone/tiny-soup"])
    one_error_line(result, "could not reach the Hugging Face Hub to push someone/tiny-soup",
                   "Temporary failure in name resolution", "nothing was uploaded", "is complete")
    assert calls == [("create", "someone/tiny-soup"), ("upload", "someone/tiny-soup")]
    assert (out / "model.safetensors").read_bytes() == (study / "ref0" / "model.safetensors").read_bytes()
    assert "hf-hub:someone/tiny-soup" in (out / "README.md").read_text()


@pytest.mark.parametrize("repo", ["ownér/name", "a/b..c", "o" * 300 + "/name", "a/b.git", "-a/b", "a/b/c",
                                  "a--b/c"])
def test_push_names_the_hub_refuses_are_refused_before_any_work(study, tmp_path, monkeypatch, repo):
    calls = fake_hub(monkeypatch, AssertionError("no upload expected"))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(ingredient_path(study)), str(out), "--push", repo])
    one_error_line(result, "--push", "the Hub would refuse this repo id", "OWNER/NAME")
    assert not out.exists() and calls == []


def test_push_names_follow_the_hubs_rules_without_huggingface_hub(monkeypatch):
    monkeypatch.setattr(export_module, "huggingface_hub", None)
    for repo in ("ownér/name", "a/b..c", "o" * 97 + "/name", "a/b.git", "-a/b", "a/b-", "a/b/c", "name"):
        assert export_module.repo_id_problem(repo) is not None, repo
    for repo in ("someone/tiny-soup", "a_/b", "Org.Name/model_v2.1", "o" * 96 + "/n"):
        assert export_module.repo_id_problem(repo) is None, repo


def test_a_hub_rejection_is_reported_as_a_rejection(study, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError

    client = hub_client()
    request = client.Request("POST", "https://huggingface.co/api/models/someone/tiny-soup/commit/main")
    rejections = [HfHubHTTPError("403 Forbidden: you have no write access to someone/tiny-soup",
                                 response=client.Response(403, request=request)),
                  HfHubHTTPError("400 Bad Request: invalid repo name",
                                 response=client.Response(400, request=request)),
                  HFValidationError("Repo id must use alphanumeric chars: 'someone/tiny-soup'")]
    for error in rejections:
        fake_hub(monkeypatch, error)
        out = tmp_path / type(error).__name__ / str(rejections.index(error))
        result = CliRunner().invoke(cli, ["export", str(ingredient_path(study)), str(out), "--push",
                                          "someone/tiny-soup"])
        one_error_line(result, "the Hub refused the push to someone/tiny-soup", str(error).split(":")[0],
                       "nothing was uploaded")
        assert "could not reach" not in result.output


# Item 9: the submission and its provenance agree after any kill -------------------------------------------

class Killed(BaseException):
    """What a kill -9 leaves is what the disk holds when this stops the command (no cleanup code catches it)."""


def kill_at_the_csv(monkeypatch, args):
    """`soup ARGS` stopped where the provenance is written and the CSV not yet."""
    import soup.ship.submit as submit_module

    def killed(path, data):
        raise Killed

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(submit_module, "_write_csv", killed)
        CliRunner().invoke(cli, args)


def test_a_submit_killed_between_its_two_files_is_found_by_the_rerun(study, tmp_path, monkeypatch, sketch_root):
    first, second = ingredient_path(study, 0), ingredient_path(study, 1)
    out = tmp_path / "s.csv"
    sidecar = tmp_path / "s.csv.json"
    # The first submission of other test images (7, not 5): its CSV differs from the second's.
    assert CliRunner().invoke(cli, ["submit", str(first), "-o", str(out), "--data", str(sketch_root)]).exit_code == 0
    old_csv = out.read_bytes()
    kill_at_the_csv(monkeypatch, ["submit", str(second), "-o", str(out), "--overwrite"])
    # The provenance of the second run beside the first run's CSV: it names the CSV it was written for.
    assert out.read_bytes() == old_csv and str(second) in sidecar.read_text()
    result = CliRunner().invoke(cli, ["submit", str(first), "-o", str(out)])
    one_error_line(result, str(out), "is not the submission", "interrupted", "--overwrite")
    result = CliRunner().invoke(cli, ["submit", str(second), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0 and "note:" in result.output and "interrupted" in result.output, result.output
    recorded = json.loads(sidecar.read_text())
    assert recorded["csv_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert recorded["members"][0]["path"] == str(second)
    result = CliRunner().invoke(cli, ["submit", str(second), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0 and "note:" not in result.output  # a consistent pair: nothing to say


def test_a_submit_killed_before_its_csv_is_found_by_the_rerun(study, tmp_path, monkeypatch):
    out = tmp_path / "s.csv"
    kill_at_the_csv(monkeypatch, ["submit", str(ingredient_path(study)), "-o", str(out)])
    assert not out.exists() and (tmp_path / "s.csv.json").is_file()
    result = CliRunner().invoke(cli, ["submit", str(ingredient_path(study)), "-o", str(out)])
    one_error_line(result, "s.csv.json", "was never written", "--overwrite")


# Items 6, 14 (soups.csv), 15: side logs never cost the soup; people's CSV files never run formulas ----------

@pytest.fixture
def kitchen(study, tmp_path, monkeypatch):
    """A copy of the study's checkpoints in a folder of the test's own, as the current folder; its recipe
    folder (where soups.csv goes)."""
    shutil.copytree(study / "checkpoints", tmp_path / "checkpoints")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "checkpoints" / "tiny"


def cook_uniform(monkeypatch, output="soup.safetensors"):
    return invoke_with_console(["cook", "--uniform", "--no-eval", "checkpoints/tiny", "-o", output], monkeypatch,
                               width=400)


def warnings_of(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("warning")]


@pytest.mark.parametrize("log", ["folder", "latin-1", "other columns"])
def test_a_soups_csv_soup_cannot_use_is_one_warning_and_the_soup_is_written(kitchen, monkeypatch, log):
    soups = kitchen / "soups.csv"
    if log == "folder":
        soups.mkdir()
    elif log == "latin-1":
        soups.write_bytes("method,soup\nuniform,café.safetensors\n".encode("latin-1"))
    else:
        soups.write_text("name,score\nmine,0.9\ntheirs,0.8\n")
    before = None if log == "folder" else soups.read_bytes()
    result = cook_uniform(monkeypatch)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    [warning] = warnings_of(result)
    assert "soups.csv" in warning and "will not be logged" in warning
    assert result.output.index("warning") < result.output.index("uniform soup")  # said before the work
    assert Path("soup.safetensors").is_file()
    assert soups.is_dir() if log == "folder" else soups.read_bytes() == before  # never touched


def test_a_log_that_fails_to_write_is_one_warning_after_the_soup(kitchen, monkeypatch):
    import soup.cook.record as record_module

    def full_disk(path):
        raise SoupError(f"cannot write {path}: No space left on device; nothing was changed there")

    monkeypatch.setattr(record_module, "atomic_path", full_disk)
    result = cook_uniform(monkeypatch)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    [warning] = warnings_of(result)
    assert "the soup was written, but not logged" in warning and "No space left on device" in warning
    assert Path("soup.safetensors").is_file()


def test_a_soup_name_that_is_not_utf8_is_logged_with_its_bytes_shown(kitchen, monkeypatch):
    name = os.fsdecode(b"caf\xe9.safetensors")
    result = cook_uniform(monkeypatch, name)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert not warnings_of(result) and Path(name).is_file()
    rows = list(csv.DictReader(io.StringIO((kitchen / "soups.csv").read_text(encoding="utf-8"))))
    assert rows[-1]["soup"] == "caf\\xe9.safetensors"
    assert cook_uniform(monkeypatch, "second.safetensors").exit_code == 0  # the log it wrote is one it reads again


def test_formula_like_cells_are_quoted_in_the_csv_files_people_read(kitchen, monkeypatch):
    result = cook_uniform(monkeypatch, "=1+2.safetensors")
    assert result.exit_code == 0, result.output
    assert cook_uniform(monkeypatch, "@SUM(A1).safetensors").exit_code == 0
    rows = list(csv.DictReader(io.StringIO((kitchen / "soups.csv").read_text(encoding="utf-8"))))
    assert [row["soup"] for row in rows] == ["'=1+2.safetensors", "'@SUM(A1).safetensors"]
    assert rows[0]["method"] == "uniform" and float(rows[0]["weights"].split(";")[0]) == 0.5
    # summary.csv: a setting recorded as text that would start a formula (-, + or a tab as well).
    for index, value in enumerate(["-cmd|' /C calc'!A0", "\t=1"]):
        path = ingredient_path(Path("."), index)
        meta = read_checkpoint(path).meta
        rewrite_metadata(path, {**meta, "settings": {**meta.get("settings", {}), "note": value}})
    write_summary(kitchen)
    rows = list(csv.DictReader(io.StringIO((kitchen / "summary.csv").read_text(encoding="utf-8"))))
    assert [row["note"] for row in rows] == ["'-cmd|' /C calc'!A0", "'\t=1"]
    assert all(float(row["val_acc"]) >= 0 for row in rows)  # numbers stay numbers


def test_the_submission_keeps_formula_like_test_ids_verbatim(study, tmp_path, small_sketch_root):
    """Kaggle matches rows by Id: a test file named =1+2.png is the Id =1+2, not '=1+2 (docs/shipping.md)."""
    data = tmp_path / "data"
    shutil.copytree(small_sketch_root, data)
    test_dir = data / "test_images" / "mistery_category"
    first = sorted(test_dir.iterdir())[0]
    first.rename(test_dir / f"=1+2{first.suffix}")
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(cli, ["submit", str(ingredient_path(study)), "--data", str(data), "-o", str(out)])
    assert result.exit_code == 0, result.output
    ids = [row["Id"] for row in csv.DictReader(io.StringIO(out.read_text(encoding="utf-8")))]
    assert "=1+2" in ids and not any(i.startswith("'") for i in ids)


# Item 14: odd names in pictures and in the model card ------------------------------------------------------

def test_plot_labels_show_newlines_and_bidi_controls_escaped(kitchen, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.text
    import soup.judge.plot as plot_module

    name = "evil\nline\u202eright$x$"
    assert cook_uniform(monkeypatch, f"{name}.safetensors").exit_code == 0
    figures = []
    real = plot_module._figure_class()

    class Recorded(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(plot_module, "_figure_class", lambda: Recorded)
    result = CliRunner().invoke(cli, ["plot", "-o", "p.png", "--reliability", "r.png", "checkpoints/tiny",
                                      f"{name}.safetensors"])
    assert result.exit_code == 0, result.output
    texts = [t.get_text() for figure in figures for t in figure.findobj(matplotlib.text.Text)]
    texts += [line.get_label() for figure in figures for axes in figure.axes for line in axes.get_lines()]
    # The id legend under the axes is lines the plot itself joins; each of its entries is escaped like a label.
    texts = [line for t in texts for line in (t.split("\n") if t.startswith("ingredient ids:") else [t])]
    assert not [t for t in texts if "\n" in t or "\u202e" in t]
    shown = [t for t in texts if "evil" in t]
    assert len(shown) >= 3 and all("evil\\nline\\u202eright\\$x\\$" in t for t in shown)  # ticks, legends


def test_the_model_card_shows_names_as_written_in_code_spans(kitchen):
    path = ingredient_path(Path("."))
    meta = read_checkpoint(path).meta
    classes = ["<circle>", "cr&oss", "squ`are", "tri\nangle"]
    rewrite_metadata(path, {**meta, "classes": classes})
    result = CliRunner().invoke(cli, ["export", str(path), "out"])
    assert result.exit_code == 0, result.output
    card = Path("out/README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("Classes, in output order"))
    assert line == "Classes, in output order: `<circle>`, `cr&oss`, ``squ`are``, `tri\\nangle`."
    assert "&lt;" not in line and "&amp;" not in line
    assert "`timm:test_resnet`" in card


def test_a_failed_export_write_leaves_dir_and_nothing_beside_it(study, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in export_files(study / "ref0").items():
        (out / name).write_bytes(data)

    def full_disk(tmp):
        raise OSError(28, "No space left on device")

    writers = export_module._writers
    monkeypatch.setattr(export_module, "_writers", lambda export: {**writers(export), "config.json": full_disk})
    result = CliRunner().invoke(cli, ["export", str(ingredient_path(study, 1)), str(out), "--overwrite"])
    one_error_line(result, "No space left on device", "left as it was")
    assert export_files(out) == export_files(study / "ref0") and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
