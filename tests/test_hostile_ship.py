"""Hostile and careless cases of shipping (issue 26): an export killed mid-swap, the Hub unreachable or
refusing, a submission killed between its two files, side logs that cannot be written, odd names in
pictures, cards and CSV files read by people."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import soup.judge.export as export_module
from soup.cli import cli

from conftest import ingredient_path, one_error_line, run_study, tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


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
import soup.judge.staging as staging
point, exchange = sys.argv[1], sys.argv[2]
def reached(where):
    if where == point:
        os.kill(os.getpid(), signal.SIGKILL)
staging._reached = reached
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


@pytest.mark.parametrize("point", ["wrote model.safetensors", "wrote config.json", "linked others", "swapped"])
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
    import soup.judge.submit as submit_module

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
