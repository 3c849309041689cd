"""benchmarks/soup_gain.py at the shipped start (`--backbone glyph-vit`, issue 33 section 3) at a tiny size:
every study fine-tunes the shipped file (not a start pretrained here), the finished draws are the ones the
soups cook, and the printed figures are the ones recomputed from the results it returns."""

from pathlib import Path

from soup.cook.best import candidate_methods
from soup.models.checkpoint import find_checkpoints
from soup.models.starts import glyph_start
from soup.score.compare import difference
from soup.score.evaluator import Evaluator

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_soup_gain_at_the_shipped_start(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import soup_gain
    tiny = ["--backbone", "glyph-vit", "--studies", "1", "--trials", "2", "--classes", "4", "--train-per-class", "4",
            "--val-per-class", "4", "--test-per-class", "3", "--epochs", "2", "--page", "32", "--best-folds", "2",
            "--space", "train.mixup", '{"choice": [0.0]}', "--work", str(tmp_path)]
    [study] = soup_gain.main(tiny)
    printed = capsys.readouterr().out
    start = glyph_start()
    assert f"regime: the shipped start glyph_vit.safetensors (sha256 {start.sha256[:12]}) at 28 px" in printed
    ingredients = find_checkpoints([tmp_path / "study0" / "checkpoints" / "study"], kinds={"ingredient"})
    assert len(ingredients) == 2 and not (tmp_path / "study0" / "pretrain").exists()
    for c in ingredients:  # the shipped file, its architecture and size, start_worth's recipe
        model, data = c.meta["recipe"]["model"], c.meta["recipe"]["data"]
        assert Path(model["weights"]) == start.weights and model["kwargs"] == start.kwargs
        assert data["image_size"] == 28 and data["augment"] == "crop_hflip"
        assert c.meta["probe"]["val_acc"] is not None
        assert c.record.settings["train.mixup"] == 0.0  # --space adds to the search's space
    fresh = study["fresh"]
    assert set(candidate_methods()) <= set(fresh) and not any("no BN reset" in n for n in fresh)
    # Finished draws at or above the probed start on the fresh test split, recomputed by a plain evaluation.
    test = Evaluator("val", tmp_path / "study0" / "test_fresh")
    [probe] = find_checkpoints([tmp_path / "study0" / "checkpoints" / "study"], kinds={"probe"})
    plain = test(probe)  # its top-1 is a float32 mean: compare counts of images right
    assert fresh["start"].correct.sum().item() == round(plain["top1"] * plain["n"])
    assert fresh["above_start"] == sum(test(c)["top1"] >= test(probe)["top1"] for c in ingredients)
    d = difference(fresh["greedy"]["outcome"], fresh["picked"]["outcome"])
    assert f"greedy {d['diff'] * 100:+.2f} [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]" in printed
    same, _ = fresh["protocols"]["same split"]
    winner, _ = fresh["protocols"]["--best, 2 folds"]
    assert same in candidate_methods() and winner in candidate_methods()
    assert f"picks {same}" in printed and f"picks {winner}" in printed
