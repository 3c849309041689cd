"""Issue 33, section 1: the pretraining set (soup/data/glyphs.py) and the start pretrained on it, shipped in
soup/assets/ with its provenance. The set and the start are rebuilt bit for bit from a seed (here at a tiny
size); the shipped file is the one its provenance names, reaches the accuracy it records on a val split
drawn again here, and soup fine-tunes from it by recipe."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from soup.cli import cli
from soup.data.glyphs import generate_glyphs, glyph_templates
from soup.errors import SoupError
from soup.models.checkpoint import find_checkpoints
from soup.models.starts import GLYPH_START, glyph_start

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "soup" / "assets" / "glyph_vit.safetensors"
assert GLYPH_START == ASSET
TINY = ["--classes", "6", "--per-class", "8", "--val-per-class", "2", "--image-size", "16", "--patch-size", "4",
        "--width", "16", "--depth", "1", "--heads", "2", "--epochs", "2", "--batch-size", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_start", ROOT / "benchmarks" / "pretrain_start.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_glyphs_are_drawn_again_bit_for_bit_from_their_seed():
    a, b = generate_glyphs(12, 4, seed=5), generate_glyphs(12, 4, seed=5)
    assert a.images.shape == (48, 32, 32) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, generate_glyphs(12, 4, seed=6).images)
    # A class's pages do not depend on how many classes are drawn; val is drawn apart from train.
    assert np.array_equal(generate_glyphs(5, 4, seed=5).images, a.images[:20])
    assert not np.array_equal(generate_glyphs(12, 4, seed=5, split="val").images, a.images)
    # Pages carry ink: no blank page, and strokes much darker than the paper.
    assert (a.images.reshape(48, -1).min(1) < a.images.reshape(48, -1).mean(1) - 60).all()


def test_glyph_classes_differ_and_a_class_is_one_character():
    """Classes are told apart by the plainest classifier (nearest class mean, chance 1/20) on pages it never
    saw: each class is one template under jitter, and templates differ."""
    templates = glyph_templates(20, seed=3)
    assert len({t.tobytes() for t in templates}) == 20
    train, val = generate_glyphs(20, 20, seed=3), generate_glyphs(20, 10, seed=3, split="val")

    def centred(images):
        flat = images.reshape(len(images), -1).astype(np.float64)
        return flat - flat.mean(1, keepdims=True)

    x, v = centred(train.images), centred(val.images)
    means = np.stack([x[train.labels == c].mean(0) for c in range(20)])
    predicted = ((v[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == val.labels).mean() > 0.3


def test_a_bad_glyph_request_is_one_error():
    with pytest.raises(SoupError, match="split"):
        generate_glyphs(2, 2, split="test")
    with pytest.raises(SoupError, match="per_class"):
        generate_glyphs(0, 2)


def test_the_pretraining_script_rebuilds_the_same_weights_from_its_seed(script, tmp_path, capsys):
    threads = torch.get_num_threads()
    first = script.main(TINY + ["--out", str(tmp_path / "a.safetensors")])
    again = script.main(TINY + ["--out", str(tmp_path / "b.safetensors")])
    other = script.main(TINY + ["--out", str(tmp_path / "c.safetensors"), "--seed", "1"])
    assert first["sha256"] == again["sha256"] != other["sha256"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["sha256"] == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    assert record["arguments"]["seed"] == 0 and record["torch"] == torch.__version__
    assert len(record["history"]) == 2 and record["seconds"] >= 0  # rounded: a tiny run may take under 0.05 s
    assert "wrote" in capsys.readouterr().out
    # The rest of the session keeps its torch settings.
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def _shipped():
    record = json.loads(ASSET.with_suffix(".json").read_text())
    return record, load_file(str(ASSET))


def test_the_shipped_start_is_the_file_its_provenance_names():
    record, state = _shipped()
    assert hashlib.sha256(ASSET.read_bytes()).hexdigest() == record["sha256"]
    assert ASSET.stat().st_size < 5 * 2 ** 20
    assert record["script"] == "benchmarks/pretrain_start.py" and record["backbone"] == "timm:vit_small_patch14_dinov2"
    assert record["data"]["classes"] >= 500 and record["data"]["train_pages"] >= 20000


def test_the_shipped_start_reaches_the_accuracy_it_records(script):
    """The recorded val top-1 recomputed from the file, on the glyphs' val split drawn again from the seed."""
    record, state = _shipped()
    data = record["data"]
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=data["classes"],
                              **record["kwargs"])
    model.load_state_dict(state, strict=True)
    val = generate_glyphs(data["classes"], record["arguments"]["val_per_class"], data["image_size"],
                          data["seed"], "val")
    assert len(val.labels) == data["val_pages"]
    accuracy = script.accuracy(model, script.as_tensor(val.images), torch.from_numpy(val.labels), 512)
    assert accuracy == pytest.approx(record["val_top1"], abs=1.5 / len(val.labels))
    assert accuracy > 0.3  # far above chance (1 / classes): a start that learned its glyphs


def test_soup_fine_tunes_from_the_shipped_start(small_sketch_root, tmp_path):
    start = glyph_start()
    record, _ = _shipped()
    assert (start.weights, start.kwargs, start.sha256) == (ASSET, record["kwargs"], record["sha256"])
    recipe = {"name": "from_start",
              "data": {"root": str(small_sketch_root), "image_size": start.image_size},
              "model": start.model_section(freeze=0.5, probe={"epochs": 1, "lr": 1.0e-3}),
              "train": {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 1.0e-4, "amp": "off",
                        "num_workers": 0, "device": "cpu", "log": "none"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["train", str(path), "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    [ingredient] = find_checkpoints([tmp_path / "runs" / "from_start"], kinds={"ingredient"})
    # The backbone started from the shipped weights: a frozen block holds them unchanged.
    _, state = _shipped()
    trained = load_file(str(ingredient.path))
    assert torch.equal(trained["backbone.blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_the_script_with_no_arguments_rebuilds_the_shipped_file(script):
    """docs/start.md says `python benchmarks/pretrain_start.py` rebuilds the file: its defaults are the
    arguments the shipped provenance records."""
    record, _ = _shipped()
    defaults = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(script.parse([])).items() if k != "out"}
    assert defaults == record["arguments"]
    assert script.parse([]).out == ASSET
