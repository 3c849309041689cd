"""benchmarks/prune_gain.py at the shipped start (`--backbone glyph-vit`, issue 33 section 3) at a tiny size:
both sweeps fine-tune the shipped file with soup_gain's glyph recipe, nothing is pretrained here, and the
counts it reports are the ones the checkpoints record."""

from pathlib import Path

from soup.models.checkpoint import find_checkpoints
from soup.models.starts import glyph_start

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_prune_gain_at_the_shipped_start(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import prune_gain
    tiny = ["--backbone", "glyph-vit", "--studies", "1", "--trials", "2", "--max-trials", "3", "--classes", "3",
            "--train-per-class", "3", "--val-per-class", "3", "--test-per-class", "2", "--epochs", "2", "--at", "1",
            "--page", "32", "--work", str(tmp_path)]
    [study] = prune_gain.main(tiny)
    printed = capsys.readouterr().out
    start = glyph_start()
    assert f"regime: the shipped start glyph_vit.safetensors (sha256 {start.sha256[:12]}) at 28 px" in printed
    assert not (tmp_path / "study0" / "pretrain").exists()
    out = tmp_path / "study0" / "checkpoints"
    for mode, folder in (("unpruned", "unpruned"), ("pruned", "pruned-start-at1")):
        drawn = find_checkpoints([out / folder], kinds={"ingredient"})
        for c in drawn:  # the shipped file, its architecture and size, soup_gain's glyph recipe
            model, data = c.meta["recipe"]["model"], c.meta["recipe"]["data"]
            assert Path(model["weights"]) == start.weights and model["kwargs"] == start.kwargs
            assert data["image_size"] == 28 and data["augment"] == "crop_hflip"
        finished = [c for c in drawn if c.record.pruned is None]
        r = study[mode]
        assert (r["draws"], r["finished"]) == (len(drawn), len(finished))
        assert r["start"] == drawn[0].record.probe.val_acc
        assert r["above"] == sum(c.record.val_acc >= r["start"] for c in finished)
    assert study["unpruned"]["draws"] == study["unpruned"]["finished"] == 2  # nothing pruned, nothing refilled
    assert study["pruned"]["epochs"] <= 3 * 2
