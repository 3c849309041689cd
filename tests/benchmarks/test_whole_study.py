"""Issue 26, item 18: benchmarks/whole_study.py, the GPU session's whole-study step, runs end to end at a tiny
size on the CPU: soup's CLI (train, cook --greedy, eval --ensemble, submit) and the seed-style plain loop,
each stage timed, then the comparison. Nothing here is timed for its figures: it only has to run."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--arch", "tiny", "--image-size", "28", "--classes", "4", "--train-per-class", "6", "--val-per-class", "3",
        "--test-images", "5", "--page", "32", "--epochs", "1", "--batch-size", "8", "--amp", "off",
        "--workers", "0", "--ingredients", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def whole_study():
    spec = importlib.util.spec_from_file_location("whole_study", ROOT / "benchmarks" / "whole_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whole_study_runs_tiny_on_the_cpu_and_compares_the_paths(whole_study, tmp_path, capsys):
    figures = whole_study.main(TINY + ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                       "--json", str(tmp_path / "figures.json")])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "figures.json").read_text())["speedup"] == figures["speedup"]
    for path, label in (("soup", "soup"), ("seed", "seed-style")):
        stages = figures[path]
        for stage in whole_study.STAGES:
            assert stages[stage]["seconds"] > 0 and stages[stage]["peak_gib"] is None  # no GPU: no peak
            assert f"stage: {label} {stage}: " in printed
        assert stages["total_seconds"] == pytest.approx(sum(stages[s]["seconds"] for s in whole_study.STAGES))
        assert 1 <= stages["greedy_members"] <= 2 and 0 <= stages["greedy_val_top1"] <= 1
        with open(tmp_path / "run" / path / "submission.csv", newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["Id", "Category"] and len(rows) == 1 + 5
    assert figures["seed"]["total_is"] == "measured"
    assert figures["speedup"] == pytest.approx(figures["seed"]["total_seconds"] / figures["soup"]["total_seconds"])
    assert "total: soup " in printed and "total: seed-style " in printed and "speedup: " in printed
    # soup's side ran through its CLI: the sweep's two ingredients, the greedy soup, soup eval's table
    assert len(list((tmp_path / "run" / "soup" / "checkpoints" / "study").glob("*/model.safetensors"))) == 2
    assert "$ soup cook --greedy" in printed and "$ soup eval --ensemble" in printed
    # the seed-style soup is scored on val like soup's: every ingredient, the soup and the ensemble
    assert len(figures["seed"]["val"]["ingredients"]) == 2


def test_seed_style_total_for_a_sweep_it_measured_in_part(whole_study):
    stage = lambda s: {"seconds": s, "peak_gib": None}  # noqa: E731
    figures = {"train": stage(20.0), "cook": stage(3.0), "eval": stage(6.0), "submit": stage(1.0)}
    total, how = whole_study.seed_total(figures, 8, 2)
    assert total == pytest.approx(20 * 8 / 2 + 3 * 7 / 1 + 6 * 9 / 3 + 1) and how.startswith("estimated for 8")
    total, _ = whole_study.seed_total(figures, 8, 1)  # one measured: a candidate costs one val pass, eval / 2
    assert total == pytest.approx(20 * 8 + 7 * 6 / 2 + 6 * 9 / 2 + 1)
    assert whole_study.seed_total(figures, 2, 2) == (30.0, "measured")
    assert not math.isnan(total)
