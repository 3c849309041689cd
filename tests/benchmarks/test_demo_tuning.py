"""benchmarks/demo_tuning.py at the demo's --small size: each band is the demo's recipe with only the lr
band changed, on its own draw of the data (not the demo's seed 2), and the printed figures are the val
accuracies a plain evaluation of its files gives."""

import re
from pathlib import Path

import pytest

from soup.models.checkpoint import find_checkpoints
from soup.score.evaluator import Evaluator

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_demo_tuning_prints_what_its_files_score(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import demo_tuning
    [line] = demo_tuning.main(["--lr", "1e-3", "2e-3", "--small", "--work", str(tmp_path)])
    drawn = find_checkpoints([tmp_path / "checkpoints" / "lr0.001-0.002"], kinds={"ingredient"})
    assert drawn and all(1e-3 <= c.record.settings["train.lr"] <= 2e-3 for c in drawn)
    assert all(Path(c.record.data_root).name == "data-seed12" for c in drawn)
    val = Evaluator("val")
    for label in ("uniform", "greedy", "greedy-loss"):
        soup = find_checkpoints([tmp_path / "checkpoints" / "soups" / f"lr0.001-0.002-{label}.safetensors"])[0]
        shown = float(re.search(rf" {label} (\d+\.\d\d)%", line).group(1))
        assert shown == pytest.approx(val(soup)["top1"] * 100, abs=0.006)
    assert find_checkpoints([tmp_path / "checkpoints" / "soups" / "lr0.001-0.002-greedy-loss.safetensors"])[0] \
        .meta["greedy"] == {"criterion": "loss"}
