"""Pruned searches (`search.prune`, `search.max_trials`, issue 25), through the CLI: draws that trail their
probed start stop at the rung and the next draws replace them until `trials` have finished; the draws and
ids are those of the unpruned search; soup cook leaves pruned draws out; a kill at a rung resumes to the
same decisions and weights."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

import soup.train.loop
import soup.train.prune
from soup.cli import cli
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train import logs
from soup.train.sweep import compute_line
from soup.models.runs import rung_file

from conftest import one_error_line, plain_top1, run_study, state_close, tiny_recipe

# An lr band from fine (1e-4) to far too high for AdamW on this model (0.3): the high draws fall below the
# probed start in their first epoch, the low ones end above it.
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SPACE = {"train.lr": {"loguniform": [1.0e-4, 0.3]}}
PROBE = {"backbone": "timm:test_resnet", "pretrained": False, "probe": {"epochs": 2, "lr": 0.01}}


def pruned_recipe(root, trials=3, max_trials=8, rule="start", at=1, epochs=3):
    search = {"trials": trials, "seed": 0, "space": SPACE}
    if rule is not None:
        search |= {"max_trials": max_trials, "prune": {"rule": rule, "at": at}}
    return tiny_recipe(root, model=PROBE, train={"epochs": epochs, "log": "none"}, search=search)


def metas(work):
    found = {p.parent.name: read_checkpoint(p).meta for p in sorted((work / "checkpoints" / "tiny").glob("*/model.safetensors"))}
    return {i: m for i, m in found.items() if m["kind"] == "ingredient"}


def timeless(history: list[dict], *more: str) -> list[dict]:
    """An epoch history less its timings (and the keys `more`)."""
    return [{k: v for k, v in record.items() if k not in ("seconds", "images_per_s", *more)} for record in history]


@pytest.fixture(scope="module")
def pruned_study(sketch_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("pruned")
    [train] = run_study(work, pruned_recipe(sketch_root))
    return work, train


def test_a_pruned_search_finishes_exactly_trials_draws_each_at_or_above_its_start(pruned_study, sketch_root):
    work, output = pruned_study
    found = metas(work)
    finished = {i: m for i, m in found.items() if not m["pruned"]}
    pruned = {i: m for i, m in found.items() if m["pruned"]}
    assert len(finished) == 3 and pruned, output  # the space holds draws below the start, and they were replaced
    start = next(iter(found.values()))["probe"]["val_acc"]
    assert all(m["val_acc"] >= start for m in finished.values())
    # Draw k is draw k: the ids tried are the first ones of the same search without pruning, in order.
    unpruned = expand_sweep(recipe_from_dict(pruned_recipe(sketch_root, trials=8, rule=None)))
    assert sorted(found) == [i.id for i in unpruned[:len(found)]]
    assert [m["settings"] for m in found.values()] == [i.settings for i in unpruned[:len(found)]]
    # The last draw tried is the one that made `trials` finished: the sweep stopped there.
    assert not found[sorted(found)[-1]]["pruned"]
    for ingredient_id, meta in pruned.items():
        decision = meta["pruned"]
        assert decision["rule"] == "start" and decision["epoch"] == 1 and decision["threshold"] == start
        assert decision["val_top1"] == meta["val_acc"] < start and len(meta["val_history"]) == 1
        # What the checkpoint records is what its weights score; metrics.json says the same.
        path = work / "checkpoints" / "tiny" / ingredient_id / "model.safetensors"
        assert plain_top1(read_checkpoint(path)) == meta["val_acc"]
        assert json.loads((path.parent / "metrics.json").read_text())["pruned"] == decision
    epochs = sum(len(m["val_history"]) for m in found.values())
    assert (f"search: 3 finished, {len(pruned)} pruned of {len(found)} draws tried; compute: {epochs} epochs "
            f"trained, {epochs / 9:.2f}x the 9 that 3 finished draws take unpruned; stopping the {len(pruned)} "
            f"pruned draws at their rung saved {2 * len(pruned)} epochs") in " ".join(output.split())
    with open(work / "checkpoints" / "tiny" / "summary.csv") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    assert {i: r["status"] for i, r in rows.items()} == {i: "pruned" if m["pruned"] else "finished"
                                                        for i, m in found.items()}


def late_fall_recipe(root):
    """Draws that tie their start at the rung and half of which end below it: epoch 1 at lr 1e-6 with the
    BatchNorm statistics frozen leaves the probed start's predictions as they were; from epoch 2 the draws
    with lr_drop_factor 10000 train at lr 0.01, far too high for AdamW here."""
    return tiny_recipe(root, model={**PROBE, "freeze_bn": True},
                       train={"epochs": 3, "log": "none", "lr": 1e-6, "lr_drop_epoch": 2},
                       search={"trials": 2, "seed": 0, "max_trials": 6, "prune": {"rule": "start", "at": 1},
                               "space": {"train.lr_drop_factor": {"choice": [1, 10000]}}})


def test_a_draw_that_passes_its_rung_and_ends_below_the_start_counts_as_pruned_and_is_replaced(sketch_root,
                                                                                                tmp_path):
    [output] = run_study(tmp_path, late_fall_recipe(sketch_root))
    found = metas(tmp_path)
    start = next(iter(found.values()))["probe"]["val_acc"]
    finished = {i: m for i, m in found.items() if not m["pruned"]}
    late = {i: m for i, m in found.items() if m["pruned"]}
    assert len(finished) == 2 and all(m["val_acc"] >= start for m in finished.values()), output
    assert late and len(found) == len(finished) + len(late)  # each fallen draw was replaced by the next
    for ingredient_id, meta in late.items():
        first, *_, last = meta["val_history"]
        assert first["rung"] == {"epoch": 1, "val_top1": first["val_top1"], "threshold": start, "rule": "start",
                                 "pruned": False, "peers": None} and first["val_top1"] >= start
        decision = meta["pruned"]
        assert decision == last["rung"] and decision["epoch"] == 3 == len(meta["val_history"])
        assert decision["val_top1"] == meta["val_acc"] < start and decision["threshold"] == start
        recorded = json.loads(rung_file(tmp_path / "checkpoints" / "tiny", 3, ingredient_id).read_text())
        assert recorded["decision"] == decision
        path = tmp_path / "checkpoints" / "tiny" / ingredient_id / "model.safetensors"
        assert plain_top1(read_checkpoint(path)) == meta["val_acc"]
    assert (f"{len(late)} pruned of {len(found)} draws tried" in " ".join(output.split())
            and f"{len(late)} of them ended below the start at their final epoch" in " ".join(output.split()))
    with open(tmp_path / "checkpoints" / "tiny" / "summary.csv") as f:
        assert {row["id"]: row["status"] for row in csv.DictReader(f)} == {
            i: "pruned" if i in late else "finished" for i in found}


def test_a_finished_draw_trains_the_same_weights_as_without_pruning(pruned_study, sketch_root, tmp_path):
    work, _ = pruned_study
    found = metas(work)
    index, ingredient_id = next((k, i) for k, (i, m) in enumerate(found.items()) if not m["pruned"] and k > 0)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(pruned_recipe(sketch_root, trials=8, rule=None)))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        result = CliRunner().invoke(cli, ["train", "r.yaml", "--ingredient", str(index)])
    assert result.exit_code == 0, result.output
    alone = read_checkpoint(tmp_path / "checkpoints" / "tiny" / ingredient_id / "model.safetensors")
    with_pruning = read_checkpoint(work / "checkpoints" / "tiny" / ingredient_id / "model.safetensors")
    assert state_close(alone.state_dict(), with_pruning.state_dict())
    assert timeless(alone.meta["val_history"]) == timeless(with_pruning.meta["val_history"], "rung")
    assert alone.meta["pruned"] is None and "rung" not in alone.meta["val_history"][0]


def test_cook_leaves_pruned_draws_out_unless_their_file_is_named(pruned_study, monkeypatch):
    work, _ = pruned_study
    found = metas(work)
    pruned = sorted(i for i, m in found.items() if m["pruned"])
    monkeypatch.chdir(work)
    result = CliRunner().invoke(cli, ["cook", "--uniform", "--no-eval", "-o", "soups/u.safetensors"])
    assert result.exit_code == 0, result.output
    members = [m["name"].removeprefix("tiny/") for m in read_checkpoint(work / "soups" / "u.safetensors").meta["members"]]
    assert sorted(members) == sorted(i for i in found if i not in pruned)
    notes = [line for line in result.output.splitlines() if "pruned" in line]
    assert len(notes) == 1 and f"left out {len(pruned)} pruned draw" in notes[0] and "warning" not in result.output
    named = [f"checkpoints/tiny/{i}/model.safetensors" for i in (pruned[0], *(i for i in found if i not in pruned))]
    result = CliRunner().invoke(cli, ["cook", "--uniform", "--no-eval", *named, "-o", "soups/named.safetensors"])
    assert result.exit_code == 0, result.output
    assert len(read_checkpoint(work / "soups" / "named.safetensors").meta["members"]) == len(named)
    assert re.search(rf"warning.*tiny/{re.escape(pruned[0])} was pruned at epoch 1", " ".join(result.output.split()))


def test_the_report_marks_the_pruned_draws(pruned_study, monkeypatch):
    work, _ = pruned_study
    found = metas(work)
    monkeypatch.chdir(work)
    result = CliRunner().invoke(cli, ["report", "checkpoints/tiny", "-o", "pruned_report.html", "--overwrite"])
    assert result.exit_code == 0, result.output
    page = (work / "pruned_report.html").read_text(encoding="utf-8")
    for draw, meta in found.items():
        said = f"tiny/{draw} (pruned at epoch {meta['pruned']['epoch']})" if meta["pruned"] else None
        assert (said in page) if said else (f"tiny/{draw} (pruned" not in page), draw
    assert any(m["pruned"] for m in found.values())


def test_list_shows_max_trials_draws_and_an_ingredient_past_the_need_trains_nothing(pruned_study, sketch_root,
                                                                                     monkeypatch):
    work, _ = pruned_study
    monkeypatch.chdir(work)
    listed = CliRunner().invoke(cli, ["train", "r.yaml", "--list"])
    assert listed.exit_code == 0 and len(listed.output.splitlines()) == 8
    untried = len(metas(work))  # the first draw the sweep did not need
    result = CliRunner().invoke(cli, ["train", "r.yaml", "--ingredient", str(untried)])
    assert result.exit_code == 0, result.output
    assert "not needed, 3 draws of this search finished already" in " ".join(result.output.split())
    assert len(metas(work)) == untried


class Killed(Exception):
    """Stands for kill -9: nothing after the injected point runs."""


def kill_after(monkeypatch, module, name, when):
    """Make the first call of module.name for which when(path, *rest) holds complete, then stop the process."""
    original = getattr(module, name)
    fired = []

    def call_then_die(path, *rest, **kwargs):
        original(path, *rest, **kwargs)
        if not fired and when(path, *rest):
            fired.append(path)
            raise Killed(str(path))

    monkeypatch.setattr(module, name, call_then_die)
    return fired


# The median rule leaves the first 3 draws alone (no 3 peers yet): 6 finished wanted, so later draws meet it.
@pytest.mark.parametrize("rule,at,trials,point", [("start", 1, 3, "rung file"), ("median", [1, 2], 6, "state")])
def test_kill_at_a_rung_then_resume_gives_the_same_decisions_and_weights(sketch_root, tmp_path, monkeypatch, rule,
                                                                        at, trials, point):
    recipe = pruned_recipe(sketch_root, trials=trials, max_trials=8, rule=rule, at=at)
    (tmp_path / "whole").mkdir()
    run_study(tmp_path / "whole", recipe)
    expected = metas(tmp_path / "whole")
    # The last draw a rung stopped; where float sums of another thread count leave every draw at or above
    # the median, the last draw whose rung decision had peers: the kill and the resume are the same test.
    decided = {i: [r["rung"] for r in m["val_history"] if isinstance(r.get("rung"), dict)]
               for i, m in expected.items()}
    pruned = [i for i, m in expected.items() if m["pruned"]]
    with_peers = [i for i, d in decided.items() if d and (rule == "start" or (d[-1].get("peers") or 0) >= 3)]
    target = max(pruned or with_peers)
    decision = expected[target]["pruned"] or decided[target][-1]
    epoch = decision["epoch"]
    work = tmp_path / "killed"
    work.mkdir()
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(work)
    decision_file = rung_file(work / "checkpoints" / "tiny", epoch, target)
    if point == "rung file":  # the decision is written, the epoch's state is not
        fired = kill_after(monkeypatch, soup.train.prune, "write_text_atomic", lambda path, *_: path.resolve() == decision_file)
    else:  # the state after the rung epoch is saved, the pruned checkpoint is not
        fired = kill_after(monkeypatch, soup.train.loop, "save_state",
                           lambda path, *rest: path.parent.name == target and rest[4] == epoch)
    killed = CliRunner().invoke(cli, ["train", "r.yaml"])
    assert isinstance(killed.exception, Killed) and fired, killed.output
    assert not (work / "checkpoints" / "tiny" / target / "model.safetensors").exists()
    written = decision_file.stat().st_mtime_ns
    monkeypatch.undo()
    monkeypatch.chdir(work)
    resumed = CliRunner().invoke(cli, ["train", "r.yaml", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert decision_file.stat().st_mtime_ns == written  # the recorded decision was taken, not taken again
    got = metas(work)
    assert list(got) == list(expected)
    for ingredient_id, meta in expected.items():
        assert got[ingredient_id]["pruned"] == meta["pruned"], ingredient_id
        assert timeless(got[ingredient_id]["val_history"]) == timeless(meta["val_history"]), ingredient_id
        again = read_checkpoint(work / "checkpoints" / "tiny" / ingredient_id / "model.safetensors")
        first = read_checkpoint(tmp_path / "whole" / "checkpoints" / "tiny" / ingredient_id / "model.safetensors")
        assert state_close(again.state_dict(), first.state_dict()), ingredient_id
    if rule == "median":  # the rule had peers: the draw was compared with at least 3
        assert decision["peers"] >= 3


@pytest.mark.parametrize("point", ["rung file", "state"])
def test_a_kill_at_the_final_epochs_decision_resumes_to_the_same_sweep(sketch_root, tmp_path, monkeypatch, point):
    recipe = late_fall_recipe(sketch_root)
    (tmp_path / "whole").mkdir()
    run_study(tmp_path / "whole", recipe)
    expected = metas(tmp_path / "whole")
    target = min(i for i, m in expected.items() if m["pruned"])
    assert expected[target]["pruned"]["epoch"] == 3
    work = tmp_path / "killed"
    work.mkdir()
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(work)
    decision_file = rung_file(work / "checkpoints" / "tiny", 3, target)
    if point == "rung file":
        fired = kill_after(monkeypatch, soup.train.prune, "write_text_atomic", lambda path, *_: path.resolve() == decision_file)
    else:
        fired = kill_after(monkeypatch, soup.train.loop, "save_state",
                           lambda path, *rest: path.parent.name == target and rest[4] == 3)
    killed = CliRunner().invoke(cli, ["train", "r.yaml"])
    assert isinstance(killed.exception, Killed) and fired, killed.output
    written = decision_file.stat().st_mtime_ns
    monkeypatch.undo()
    monkeypatch.chdir(work)
    resumed = CliRunner().invoke(cli, ["train", "r.yaml", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert decision_file.stat().st_mtime_ns == written
    got = metas(work)
    assert list(got) == list(expected)
    for ingredient_id, meta in expected.items():
        assert got[ingredient_id]["pruned"] == meta["pruned"], ingredient_id
        assert timeless(got[ingredient_id]["val_history"]) == timeless(meta["val_history"]), ingredient_id


KILL_AT_RUNG = """
import os, signal, sys
from pathlib import Path
import soup.train.prune as prune
from soup.cli import main
write, target = prune.write_text_atomic, Path(sys.argv[1]).resolve()
def write_then_die(path, *rest, **kwargs):
    write(path, *rest, **kwargs)
    if Path(path).resolve() == target:
        os.kill(os.getpid(), signal.SIGKILL)
prune.write_text_atomic = write_then_die
sys.argv = ["soup", "train", "r.yaml"]
main()
"""


def test_a_real_kill_9_right_after_a_rung_decision_resumes_to_the_same_sweep(sketch_root, tmp_path, monkeypatch):
    """The injected exceptions above, for real: SIGKILL, so no handler, lock release or clean-up code runs."""
    recipe = pruned_recipe(sketch_root, trials=3, max_trials=8, rule="start", at=1)
    (tmp_path / "whole").mkdir()
    run_study(tmp_path / "whole", recipe)
    expected = metas(tmp_path / "whole")
    target = max(i for i, m in expected.items() if m["pruned"])
    work = tmp_path / "killed"
    work.mkdir()
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    decision_file = rung_file(work / "checkpoints" / "tiny", expected[target]["pruned"]["epoch"], target)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_RUNG, str(decision_file)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert decision_file.is_file() and not (work / "checkpoints" / "tiny" / target / "model.safetensors").exists()
    monkeypatch.chdir(work)
    resumed = CliRunner().invoke(cli, ["train", "r.yaml", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    got = metas(work)
    assert list(got) == list(expected)
    for ingredient_id, meta in expected.items():
        assert got[ingredient_id]["pruned"] == meta["pruned"], ingredient_id
        again = read_checkpoint(work / "checkpoints" / "tiny" / ingredient_id / "model.safetensors")
        first = read_checkpoint(tmp_path / "whole" / "checkpoints" / "tiny" / ingredient_id / "model.safetensors")
        assert state_close(again.state_dict(), first.state_dict()), ingredient_id


@pytest.mark.parametrize("search,message", [
    ({"prune": {"rule": "start", "at": 1}, "max_trials": 4}, "search.prune.rule start compares each draw with its "
                                                             "probed start, and this recipe has no model.probe"),
    ({"prune": {"rule": "medain", "at": 1}}, "search.prune.rule: expected one of start, median"),
    ({"prune": {"rule": "median", "at": 1, "every": 2}}, "unknown key 'search.prune.every'"),
    ({"prune": {"rule": "median"}}, "missing required key 'search.prune.at'"),
    ({"prune": {"rule": "median", "at": [1, 3]}}, "search.prune.at must name epochs from 1 to 2"),
    ({"prune": {"rule": "median", "at": []}}, "search.prune.at needs at least one epoch"),
    ({"prune": {"rule": "median", "at": 1}, "max_trials": 2}, "search.max_trials must be at least search.trials (3)"),
    ({"max_trials": 6}, "search.max_trials draws more only to replace pruned draws"),
    ({"max_trial": 6}, "unknown key 'search.max_trial' (did you mean 'search.max_trials'?)"),
    ({"prune": {"rule": "median", "at": 1}, "max_trials": 2000}, "search.max_trials: 2000 trials"),
])
def test_bad_pruning_keys_are_one_line_before_any_data(tmp_path, search, message):
    recipe = tiny_recipe(tmp_path / "no_data_here", train={"epochs": 3},
                         search={"trials": 3, "space": SPACE, **search})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    one_error_line(CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "--list"]), message)


def test_prune_gain_benchmark_at_a_tiny_size(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import prune_gain
    tiny = ["--studies", "1", "--classes", "4", "--train-per-class", "6", "--val-per-class", "4", "--test-per-class",
            "4", "--epochs", "3", "--at", "1", "--trials", "2", "--max-trials", "4", "--pretrain-epochs", "1",
            "--pretrain-per-class", "6", "--image-size", "32", "--page", "32", "--work", str(tmp_path)]
    [study] = prune_gain.main(tiny)
    printed = capsys.readouterr().out
    unpruned, pruned = study["unpruned"], study["pruned"]
    assert unpruned["draws"] == unpruned["finished"] == 2 and unpruned["epochs"] == 6
    assert pruned["finished"] <= 2 and pruned["draws"] <= 4 and pruned["above"] == pruned["finished"]
    # Finished draws train 3 epochs; pruned ones stop at the rung after 1, or end below the start at epoch 3.
    at_end = (pruned["epochs"] - 3 * pruned["finished"] - (pruned["draws"] - pruned["finished"])) / 2
    assert at_end == int(at_end) and 0 <= at_end <= pruned["draws"] - pruned["finished"]
    assert re.search(rf"^unpruned +{unpruned['above']} of 2 +3\.00 +1\.00x", printed, re.M), printed
    if pruned["finished"]:
        rate = pruned["epochs"] / pruned["finished"]
        assert re.search(rf"^pruned +{pruned['above']} of {pruned['finished']} +{rate:.2f} +{rate / 3:.2f}x",
                         printed, re.M), printed
    else:
        assert re.search(rf"^pruned +0 of 0 +no finished draw: {pruned['epochs']} epochs trained", printed,
                         re.M), printed


def test_summary_says_running_for_a_draw_with_a_state_and_no_checkpoint(pruned_study, tmp_path):
    work, _ = pruned_study
    folder = tmp_path / "tiny"
    shutil.copytree(work / "checkpoints" / "tiny", folder)
    (folder / "99-lr0.001").mkdir()
    (folder / "99-lr0.001" / "state.pt").write_bytes(b"")
    with open(logs.write_summary(folder)) as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    assert rows["99-lr0.001"]["status"] == "running" and rows["99-lr0.001"]["val_acc"] == ""
    assert sum(row["status"] == "finished" for row in rows.values()) == 3


def test_peer_rung_files_edited_upward_are_checked_against_their_checkpoints(small_sketch_root, tmp_path,
                                                                             monkeypatch):
    """Issue 31 K: three finished draws' rung files edited to say 0.99 would prune every new draw under the
    median rule; their checkpoints' val history is what counts, and one warning says which files disagree."""
    monkeypatch.chdir(tmp_path)
    run_study(tmp_path, pruned_recipe(small_sketch_root, trials=3, rule="median", epochs=2))
    found = metas(tmp_path)
    assert len(found) == 3 and not any(m["pruned"] for m in found.values())  # fewer than 3 peers: none pruned
    real = sorted(m["val_history"][0]["val_top1"] for m in found.values())
    for ingredient_id in found:
        path = rung_file(tmp_path / "checkpoints" / "tiny", 1, ingredient_id)
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "val_top1": 0.99}))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(pruned_recipe(small_sketch_root, trials=4, rule="median",
                                                                  epochs=2)))
    result = CliRunner().invoke(cli, ["train", "r.yaml", "--resume"])
    assert result.exit_code == 0, result.output
    assert "rung files at epoch 1 disagree with their draws' checkpoints" in result.output
    assert "99.00% vs" in result.output
    new = {i: m["val_history"][0]["rung"] for i, m in metas(tmp_path).items() if i not in found}
    first = new[min(new)]
    assert first["peers"] == 3 and first["threshold"] == real[1]  # the median of what the checkpoints record
    assert all(rung["threshold"] < 0.99 for rung in new.values())


def test_a_search_that_pruned_nothing_says_so_in_one_short_line():
    """Nothing to compare with an unpruned sweep: no ratio, no zero saved (the demo's case at a strong start)."""
    def record(epochs_run, pruned=None):
        return SimpleNamespace(pruned=pruned, history=[{}] * epochs_run, recipe={"train": {"epochs": 4}})
    assert compute_line([record(4), record(4)], wanted=2, drawn=4) == "search: 2 finished, none pruned; 8 epochs trained"
    # One pruned at its rung: the long line with the ratio and the epochs saved.
    line = compute_line([record(4), record(2, SimpleNamespace(epoch=2)), record(4)], wanted=2, drawn=4)
    assert line == ("search: 2 finished, 1 pruned of 3 draws tried; compute: 10 epochs trained, 1.25x the 8 that 2 "
                    "finished draws take unpruned; stopping the 1 pruned draws at their rung saved 2 epochs")
    # Too few finished: the long line, which says what to raise.
    assert "raise it or narrow the space" in compute_line([record(4)], wanted=2, drawn=1)
