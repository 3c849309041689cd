"""soup import gets the model right (issue 31, section 4): the input size, mean and std it was trained with
(recorded, fixed by a ViT's position embedding, given with --image-size/--mean/--std, or assumed in one
line), sources of one architecture compared as the model they build, and --start pretrained offline
failing at once. Sources are written by the library that owns each format (torch.save, Lightning,
timm's CheckpointSaver and save_for_hf), imported and evaluated through the CLI."""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from timm.utils import CheckpointSaver

from soup.cli import cli
from soup.data.folders import load_split
from soup.errors import SoupError
from soup.models.backbones import model_from_checkpoint
from soup.models.checkpoint import read_checkpoint
from soup.outside import offline
from soup.recipe.spec import DataConfig

from conftest import CLASSES, one_error_line

ARCH = "test_resnet"
SIZE = 32
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
OPTIONS = ["--image-size", str(SIZE), "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


def _invoke(work: Path, *args):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(work: Path, *args) -> str:
    result = _invoke(work, *args)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps at the terminal's width


def _images(root, size=SIZE, mean=MEAN, std=STD, split="val") -> tuple[torch.Tensor, torch.Tensor]:
    data = load_split(DataConfig(str(root), image_size=size, mean=mean, std=std), split, classes=CLASSES)
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor([data[i][1] for i in range(len(data))])


def _top1(model: torch.nn.Module, root, size=SIZE) -> float:
    images, targets = _images(root, size)
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == targets).double().mean().item()


def _eval_top1(work: Path, path: Path) -> float:
    [row] = json.loads(_invoke(work, "eval", path, "--json", "--bootstrap", "0").output)
    return row["top1"]


@pytest.fixture(scope="module")
def trained(sketch_root) -> torch.nn.Module:
    """A timm ResNet fine-tuned at 32 px with mean 0.5 / std 0.25 (not timm's 160 px, 0.5 / 0.5)."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = _images(sketch_root, split="train")
    for _ in range(4):
        model.train()
        for batch in torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).split(16):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_a_plain_state_dict_says_what_it_assumed_and_takes_the_options(trained, sketch_root, tmp_path):
    """The issue's case: 32 px weights in a plain state dict were evaluated at timm's 160 px without a word.
    Now the assumption is one line, and --image-size/--mean/--std give the figure of the weights at 32 px."""
    torch.save(trained.state_dict(), tmp_path / "weights.pth")
    out = _ok(tmp_path, "import", "weights.pth", "--data", sketch_root, "--model", ARCH, "--name", "assumed")
    assert ("no source records its image size, mean, std: assumed 160 px, mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5] "
            "(timm's pretrained_cfg for test_resnet); set --image-size, --mean, --std if it was trained otherwise") in out
    assumed = tmp_path / "checkpoints" / "assumed" / "00-weights" / "model.safetensors"
    assert read_checkpoint(assumed).recipe["data"]["image_size"] == 160

    out = _ok(tmp_path, "import", "weights.pth", "--data", sketch_root, "--model", ARCH, *OPTIONS, "--name", "given")
    assert "assumed" not in out
    given = tmp_path / "checkpoints" / "given" / "00-weights" / "model.safetensors"
    checkpoint = read_checkpoint(given)
    assert checkpoint.recipe["data"]["image_size"] == SIZE
    assert checkpoint.recipe["data"]["mean"] == MEAN and checkpoint.recipe["data"]["std"] == STD
    assert checkpoint.meta["imported"]["preprocessing_from"] == {"image_size": "--image-size", "mean": "--mean",
                                                                 "std": "--std"}
    by_hand = _top1(trained, sketch_root)
    assert _eval_top1(tmp_path, given) == pytest.approx(by_hand, abs=1e-6)
    assert by_hand > 0.5 and _eval_top1(tmp_path, assumed) < by_hand  # the size was what the figure hung on


def _lightning_ckpt(model: torch.nn.Module, path: Path, **hparams) -> None:
    """A .ckpt written by Lightning's own Trainer, its module's hyper_parameters as given, the weights `model`'s."""
    import lightning  # the test extra

    class Module(lightning.LightningModule):
        def __init__(self, arch: str = ARCH, **kwargs):
            super().__init__()
            self.save_hyperparameters()
            self.model = timm.create_model(arch, pretrained=False, num_classes=len(CLASSES))

        def validation_step(self, batch, index):
            return None

    module = Module(**hparams)
    module.model.load_state_dict(model.state_dict())
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False)
    data = torch.utils.data.TensorDataset(torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, dtype=torch.long))
    trainer.validate(module, torch.utils.data.DataLoader(data), verbose=False)  # attaches it; trains nothing
    trainer.save_checkpoint(path)


def test_a_lightning_checkpoint_records_its_size_and_an_option_overrides_it_with_a_note(trained, sketch_root,
                                                                                         tmp_path):
    _lightning_ckpt(trained, tmp_path / "run.ckpt", image_size=SIZE, mean=MEAN, std=STD)
    out = _ok(tmp_path, "import", "run.ckpt", "--data", sketch_root)
    assert "assumed" not in out
    path = tmp_path / "checkpoints" / "imported" / "00-run" / "model.safetensors"
    checkpoint = read_checkpoint(path)
    assert checkpoint.recipe["data"]["image_size"] == SIZE and checkpoint.recipe["data"]["std"] == STD
    assert checkpoint.meta["imported"]["preprocessing_from"]["image_size"] == "recorded by run.ckpt"
    assert _eval_top1(tmp_path, path) == pytest.approx(_top1(trained, sketch_root), abs=1e-6)
    out = _ok(tmp_path, "import", "run.ckpt", "--data", sketch_root, "--image-size", "48", "--name", "other")
    assert "note: --image-size 48 px wins over the 32 px run.ckpt records" in out


@pytest.mark.parametrize("case", ["--image-size 0", "--image-size big", "--mean 0.5,0.5", "--mean nan,0,0",
                                  "--std 0,0.2,0.2", "--std 1,2,3"])
def test_bad_options_are_one_line_and_write_nothing(trained, small_sketch_root, tmp_path, case):
    torch.save(trained.state_dict(), tmp_path / "weights.pth")
    option, value = case.split()
    result = _invoke(tmp_path, "import", "weights.pth", "--data", small_sketch_root, "--model", ARCH, option, value)
    one_error_line(result, f"{option} {value}:")
    assert not (tmp_path / "checkpoints").exists()


def test_a_vit_state_dict_is_built_at_its_position_embeddings_size(small_sketch_root, tmp_path):
    """timm's test_vit (16 px patches, 160 px by default) fine-tuned at 32 px: its position embedding is
    2x2 patches + the class token, so it is built at 32 px; it takes any size (dynamic_img_size), so the
    size it was fed is assumed, and said: the size it is built for, not timm's 160."""
    torch.manual_seed(0)
    network = timm.create_model("test_vit", pretrained=False, num_classes=len(CLASSES), img_size=SIZE).eval()
    torch.save(network.state_dict(), tmp_path / "vit.pth")
    out = _ok(tmp_path, "import", "vit.pth", "--data", small_sketch_root, "--model", "test_vit", "--mean",
              "0.5,0.5,0.5", "--std", "0.25,0.25,0.25")
    assert "built timm:test_vit for 32 px (img_size), as vit.pth's position embedding says: 2x2 patches of 16 px" in out
    assert ("no source records its image size: assumed 32 px (the size timm:test_vit is built for, by vit.pth's "
            "position embedding (2x2 patches of 16 px)), though timm:test_vit takes other sizes too") in out
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-vit" / "model.safetensors")
    assert checkpoint.recipe["model"]["kwargs"] == {"img_size": SIZE}
    assert checkpoint.recipe["data"]["image_size"] == SIZE
    images, _ = _images(small_sketch_root)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(checkpoint)(images), network(images))


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_a_dinov2_fine_tuned_at_another_size_imports(small_sketch_root, tmp_path, arch):
    """DinoV2's ViT (518 px by default; the class token embedded, or not with registers) fine-tuned at 28 px
    by timm's train.py, whose args record the model's shape but no image size."""
    shape = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    network = timm.create_model(arch, pretrained=False, num_classes=len(CLASSES), img_size=28, **shape).eval()
    args = argparse.Namespace(model=arch, num_classes=len(CLASSES), input_size=None, img_size=None, mean=None,
                              std=None, model_kwargs=shape)
    CheckpointSaver(network, torch.optim.SGD(network.parameters(), lr=0.1), args=args,
                    checkpoint_dir=str(tmp_path)).save_checkpoint(0)
    out = _ok(tmp_path, "import", "checkpoint-0.pth.tar", "--data", small_sketch_root)
    assert "position embedding says: 2x2 patches of 14 px" in out
    assert f"assumed mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] (timm's pretrained_cfg for {arch})" in out
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-checkpoint-0" / "model.safetensors")
    assert checkpoint.recipe["model"]["kwargs"] == {**shape, "img_size": 28}
    assert checkpoint.recipe["data"]["image_size"] == 28
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(checkpoint)(images), network(images))
    # Fixed-size (no dynamic_img_size): fed the size it is built for, and no other.
    assert checkpoint.meta["imported"]["preprocessing_from"]["image_size"].startswith(f"the only size timm:{arch} takes")
    result = _invoke(tmp_path, "import", "checkpoint-0.pth.tar", "--data", small_sketch_root, "--image-size", "56",
                     "--name", "wrong")
    one_error_line(result, f"--image-size: 56 px, but timm:{arch} as built takes 28 px only")


def _hub_folder(folder: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES), **kwargs),
                            str(folder), safe_serialization=True)
    return folder


def test_recorded_defaults_are_the_same_model_as_none(small_sketch_root, tmp_path):
    """save_for_hf writes in_chans 3 and global_pool avg into config.json; a plain state dict records none:
    one model. A folder saved with global_pool max is another, and the two sources are named."""
    folder = _hub_folder(tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["model_args"]["global_pool"] == "avg"
    torch.save(timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES)).state_dict(), tmp_path / "plain.pth")
    _ok(tmp_path, "import", "hf", "plain.pth", "--data", small_sketch_root, "--model", ARCH)
    assert len(list((tmp_path / "checkpoints" / "imported").glob("*/model.safetensors"))) == 2
    _hub_folder(tmp_path / "maxpool", global_pool="max")
    result = _invoke(tmp_path, "import", "plain.pth", "maxpool", "--data", small_sketch_root, "--model", ARCH,
                     "--name", "mixed")
    one_error_line(result, "plain.pth and maxpool are different timm:test_resnet models: plain.pth was built with "
                   "{'global_pool': \"timm's default\"}, maxpool with {'global_pool': 'max'}")
    assert not (tmp_path / "checkpoints" / "mixed").exists()


def test_a_recorded_img_size_and_a_position_embedding_saying_it_are_one_model(small_sketch_root, tmp_path):
    """save_for_hf records img_size [28, 28]; a timm train.py checkpoint of the same DinoV2 records only its
    shape, and its position embedding says 28 px: one model, imported together."""
    shape = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    arch = "vit_small_patch14_dinov2"
    torch.manual_seed(0)
    network = timm.create_model(arch, pretrained=False, num_classes=len(CLASSES), img_size=28, **shape)
    timm.models.save_for_hf(network, str(tmp_path / "hf"), safe_serialization=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_args"]["img_size"] == [28, 28]
    args = argparse.Namespace(model=arch, num_classes=len(CLASSES), model_kwargs=shape)
    (tmp_path / "run").mkdir()
    CheckpointSaver(network, torch.optim.SGD(network.parameters(), lr=0.1), args=args,
                    checkpoint_dir=str(tmp_path / "run")).save_checkpoint(0)
    _ok(tmp_path, "import", "hf", "run/checkpoint-0.pth.tar", "--data", small_sketch_root)
    paths = sorted((tmp_path / "checkpoints" / "imported").glob("*/model.safetensors"))
    assert [read_checkpoint(p).recipe["data"]["image_size"] for p in paths] == [28, 28]


@pytest.fixture
def unplugged(tmp_path, monkeypatch):
    """No network, as on a machine without one (connections fail at once), and an empty Hugging Face cache
    with offline mode not set: what a user meets on a plane."""
    import huggingface_hub.constants

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_start_pretrained_unplugged_fails_at_once(trained, small_sketch_root, tmp_path, unplugged):
    torch.save(trained.state_dict(), tmp_path / "weights.pth")
    began = time.monotonic()
    result = _invoke(tmp_path, "import", "weights.pth", "--data", small_sketch_root, "--model", ARCH, *OPTIONS,
                     "--start", "pretrained")
    elapsed = time.monotonic() - began
    one_error_line(result, "--start pretrained: timm's pretrained weights for test_resnet are not in the local cache",
                   "huggingface.co cannot be reached", "--start FILE")
    assert elapsed < 10, f"{elapsed:.0f} s"  # huggingface_hub's retries took about 47 s here
    assert not (tmp_path / "checkpoints").exists()


def test_start_pretrained_from_the_cache_needs_no_network(trained, small_sketch_root, tmp_path, unplugged,
                                                         monkeypatch):
    """Cached weights are used as they are, network or not; and where the Hub answers, nothing is refused
    (timm downloads, with its retries, as it would)."""
    repo = unplugged / f"models--{timm.models.get_pretrained_cfg(ARCH).hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(trained.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    torch.save(trained.state_dict(), tmp_path / "weights.pth")
    out = _ok(tmp_path, "import", "weights.pth", "--data", small_sketch_root, "--model", ARCH, *OPTIONS,
              "--start", "pretrained")
    assert "start:" in out
    with pytest.raises(SoupError, match="huggingface.co cannot be reached"):
        offline.check_pretrained("timm:test_vit")  # not cached, and no network

    class Answered:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: Answered())
    offline.check_pretrained("timm:test_vit")
