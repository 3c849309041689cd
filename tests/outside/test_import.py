"""soup import (issue 27): checkpoints written by the library that owns each format (timm's CheckpointSaver
and save_for_hf, Lightning's Trainer.save_checkpoint, torch.save), imported through the CLI as soup
ingredients that every later command takes; a greedy soup of them checked against a hand computation."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from click.testing import CliRunner
from timm.utils import CheckpointSaver, ModelEmaV3
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from soup.cli import cli
from soup.data.folders import class_list, load_split
from soup.models.backbones import build_model, model_from_checkpoint, trusting_hubs
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import DataConfig, ModelConfig

from conftest import CLASSES, RecordedImages, one_error_line, run_study, tiny_recipe

ARCH = "test_resnet"
SIZE = 32
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
LRS = [0.01, 0.03, 0.1]


def _data(root) -> DataConfig:
    return DataConfig(str(root), image_size=SIZE, mean=MEAN, std=STD)


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))


def _train_run(folder: Path, root: Path, seed: int, base_state: dict) -> None:
    """A timm train.py run as its script leaves it: CheckpointSaver files (with EMA) beside args.yaml."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
    model.load_state_dict(base_state)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=LRS[seed], momentum=0.9)
    args = argparse.Namespace(model=ARCH, num_classes=len(CLASSES), input_size=[3, SIZE, SIZE], img_size=None,
                              mean=MEAN, std=STD, crop_pct=None, model_kwargs={}, lr=LRS[seed], seed=seed)
    folder.mkdir(parents=True)
    (folder / "args.yaml").write_text(yaml.safe_dump(vars(args)))
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder))
    train = load_split(_data(root), "train", classes=CLASSES)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    for epoch in range(2):
        model.train()
        for images, targets in loader:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(model)
        saver.save_checkpoint(epoch, metric=float(epoch))  # the last epoch is the best: model_best = it


def _raw(path: Path) -> dict:
    """A file the test itself wrote, read back the way torch reads it (the test trusts its own files)."""
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sketch_root):
    """Three timm runs from one start (start.pth), on 320 sketches: 2 epochs, lr 0.01, 0.03, 0.1."""
    work = tmp_path_factory.mktemp("import")
    base = _base()
    torch.save(base.state_dict(), work / "start.pth")
    for seed in range(3):
        _train_run(work / f"run{seed}", sketch_root, seed, base.state_dict())
    return work


def _invoke(work: Path, *args):
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(cwd)


def _ok(work: Path, *args) -> str:
    result = _invoke(work, *args)
    assert result.exit_code == 0, result.output
    return result.output


def _flat(output: str) -> str:
    """The console's output as one line: rich wraps it at the terminal's width."""
    return " ".join(output.split())


def _timm_logits(state: dict, images: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(images)


def _val(root) -> tuple[torch.Tensor, torch.Tensor]:
    split = load_split(_data(root), "val", classes=CLASSES)
    return torch.stack([split[i][0] for i in range(len(split))]), torch.tensor([split[i][1] for i in range(len(split))])


def _with_bn_reset(state: dict, soup) -> dict:
    """`state` (timm's keys) with update_bn's statistics on the train images the soup records (cooking
    re-estimates them for every mix, soup.cook.batchnorm)."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
    model.load_state_dict(state)
    update_bn(DataLoader(RecordedImages(soup), batch_size=soup.meta["bn_reset"]["batch_size"]), model)
    fresh = model.state_dict()
    return {k: fresh[k] if k.endswith(("running_mean", "running_var", "num_batches_tracked")) else v
            for k, v in state.items()}


def _top1(state: dict, root) -> float:
    images, targets = _val(root)
    return (_timm_logits(state, images).argmax(1) == targets).double().mean().item()


def test_greedy_soup_of_timm_runs_matches_a_hand_computation(runs, sketch_root):
    out = _ok(runs, "import", "run0", "run1", "run2", "--data", sketch_root, "--start", "start.pth",
              "--name", "timm")
    assert "timm train.py folder" in out and "start:" in out
    folder = runs / "checkpoints" / "timm"
    paths = sorted(folder.glob("*/model.safetensors"))
    assert [p.parent.name for p in paths] == ["00-run0", "01-run1", "02-run2"]
    sources = [_raw(runs / f"run{i}" / "model_best.pth.tar")["state_dict"] for i in range(3)]
    for path, source, i in zip(paths, sources, range(3)):
        checkpoint = read_checkpoint(path)
        best = runs / f"run{i}" / "model_best.pth.tar"
        assert checkpoint.meta["imported"]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
        assert checkpoint.meta["imported"]["file"] == str(best.resolve())
        assert checkpoint.classes == CLASSES and checkpoint.backbone == f"timm:{ARCH}"
        recipe = checkpoint.recipe
        assert recipe["data"]["image_size"] == SIZE and recipe["data"]["mean"] == MEAN and recipe["data"]["std"] == STD
    assert len({read_checkpoint(p).fingerprint for p in paths}) == 1

    _ok(runs, "cook", "--greedy", folder, "-o", "soups/greedy.safetensors")
    soup = read_checkpoint(runs / "soups" / "greedy.safetensors")
    # By hand: rank the sources by val top-1 in timm itself (ties keep the order given), start from the best,
    # add each next one when the plain average with it (its BatchNorm statistics measured by update_bn)
    # scores at least as well.
    scored = sorted(((_top1(s, sketch_root), i) for i, s in enumerate(sources)), key=lambda x: -x[0])
    kept, best = [scored[0][1]], scored[0][0]
    steps = [best]
    for _, i in scored[1:]:
        trial = {k: sum(sources[j][k].float() for j in kept + [i]) / (len(kept) + 1) for k in sources[0]
                 if sources[0][k].is_floating_point()}
        trial |= {k: v for k, v in sources[kept[0]].items() if not v.is_floating_point()}
        top1 = _top1(_with_bn_reset(trial, soup), sketch_root)
        steps.append(top1)
        if top1 >= best:
            kept, best = kept + [i], top1
    assert [m["name"] for m in soup.meta["members"]] == [f"timm/{i:02d}-run{i}" for i in kept]
    assert [s["top1"] for s in soup.meta["steps"]] == pytest.approx(steps, abs=1e-6)
    assert soup.meta["selection"]["top1"] == pytest.approx(best, abs=1e-6)
    assert len({round(t, 6) for t, _ in scored}) > 1  # the ranking was not a tie: the test can tell orders apart

    # Every later command takes them as it takes soup's own; the start known, Model Stock and inspect work.
    _ok(runs, "cook", "--stock", folder, "--no-eval", "-o", "soups/stock.safetensors")
    assert "distance" in _ok(runs, "inspect", folder)
    rows = json.loads(_ok(runs, "eval", folder, "soups/greedy.safetensors", "--json"))
    assert len(rows) == 4
    _ok(runs, "submit", paths[0], "-o", "submission.csv")
    _ok(runs, "export", "soups/greedy.safetensors", "exported")
    _ok(runs, "report", folder, "-o", "report.html")
    _ok(runs, "plot", folder, "soups/greedy.safetensors", "-o", "soups.png")


def test_ema_takes_state_dict_ema(runs, small_sketch_root):
    _ok(runs, "import", "run1", "--data", small_sketch_root, "--ema", "--name", "ema")
    _ok(runs, "import", "run1", "--data", small_sketch_root, "--name", "raw")
    saved = _raw(runs / "run1" / "model_best.pth.tar")
    for name, key in (("ema", "state_dict_ema"), ("raw", "state_dict")):
        checkpoint = read_checkpoint(runs / "checkpoints" / name / "00-run1" / "model.safetensors")
        state = checkpoint.state_dict()
        expected = {("head." + k[3:] if k.startswith("fc.") else "backbone." + k): v for k, v in saved[key].items()}
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k].float() if expected[k].is_floating_point() else expected[k])
                   for k in state)
        assert checkpoint.meta["imported"]["weights"] == key
    assert not torch.equal(saved["state_dict"]["fc.weight"], saved["state_dict_ema"]["fc.weight"])


@pytest.mark.parametrize("safe", [True, False])
def test_hub_folder_from_save_for_hf(small_sketch_root, tmp_path, safe):
    """timm's save_for_hf (model.safetensors or pytorch_model.bin), its label names in another order: the
    head's rows are put in the data root's order, so the logits per class are timm's."""
    model = _base()
    order = [2, 0, 3, 1]
    names = [CLASSES[i] for i in order]
    folder = tmp_path / "hf"
    timm.models.save_for_hf(model, str(folder), safe_serialization=safe, model_config={"label_names": names},
                            data_config={"input_size": (3, SIZE, SIZE), "mean": MEAN, "std": STD})
    out = _flat(_ok(tmp_path, "import", folder, "--data", small_sketch_root))
    assert "head rows put in the data root's class order" in out
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-hf" / "model.safetensors")
    images, _ = _val(small_sketch_root)
    with torch.no_grad():
        ours = model_from_checkpoint(checkpoint)(images)
    theirs = _timm_logits(model.state_dict(), images)
    assert torch.allclose(ours[:, [CLASSES.index(n) for n in names]], theirs, atol=1e-5)
    assert checkpoint.recipe["data"]["image_size"] == SIZE


def test_hub_folder_with_other_classes_is_refused(small_sketch_root, tmp_path):
    folder = tmp_path / "hf"
    timm.models.save_for_hf(_base(), str(folder), safe_serialization=True,
                            model_config={"label_names": ["circle", "cross", "square", "star"]})
    one_error_line(_invoke(tmp_path, "import", folder, "--data", small_sketch_root), "classes are not the data root's")
    assert not (tmp_path / "checkpoints").exists()


def test_export_imports_back_bit_for_bit(tmp_path, small_sketch_root):
    recipe = tiny_recipe(small_sketch_root, train={"batch_size": 8})
    run_study(tmp_path, recipe)
    [ingredient] = (tmp_path / "checkpoints" / "tiny").glob("*/model.safetensors")
    _ok(tmp_path, "export", ingredient, "exported")
    _ok(tmp_path, "import", "exported", "--data", small_sketch_root, "--name", "back")
    original = read_checkpoint(ingredient)
    back = read_checkpoint(tmp_path / "checkpoints" / "back" / "00-exported" / "model.safetensors")
    a, b = original.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert back.classes == original.classes and back.backbone == original.backbone
    for key in ("image_size", "mean", "std"):
        assert back.recipe["data"][key] == original.recipe["data"][key]
    assert back.recipe["model"]["kwargs"] == original.recipe["model"]["kwargs"]


class _Wrapped(torch.nn.Module):
    """A training module holding the network under an attribute, with a loss buffer beside it."""

    def __init__(self, network):
        super().__init__()
        self.model = network
        self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(len(CLASSES)))


def test_lightning_checkpoint_prefix_found_and_stripped(small_sketch_root, tmp_path):
    import lightning  # in the test extra: a real .ckpt, written by Lightning itself

    class Module(lightning.LightningModule):
        def __init__(self, arch: str = ARCH, num_classes: int = 4, lr: float = 0.01, classes: list | None = None):
            super().__init__()
            self.save_hyperparameters()
            self.model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(num_classes))

        def training_step(self, batch, index):
            images, targets = batch
            return self.criterion(self.model(images), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 3]))
    trainer = lightning.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    out = _flat(_ok(tmp_path, "import", "run.ckpt", "--data", small_sketch_root))
    assert "Lightning checkpoint" in out and "prefix 'model.' stripped" in out and "criterion.weight" in out
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-run" / "model.safetensors")
    assert checkpoint.meta["imported"]["architecture_from"] == "run.ckpt's hyper_parameters"
    expected = module.model.state_dict()
    state = checkpoint.state_dict()
    assert all(torch.equal(state[("head." + k[3:]) if k.startswith("fc.") else "backbone." + k], v)
               for k, v in expected.items())
    _ok(tmp_path, "import", "run.ckpt", "--data", small_sketch_root, "--strip-prefix", "model", "--name", "given")
    # Class names in hyper_parameters, in another order than the root's: the head's rows follow the names.
    trainer = lightning.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    module = Module(classes=CLASSES[::-1])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "named.ckpt")
    expected = module.model.state_dict()
    out = _flat(_ok(tmp_path, "import", "named.ckpt", "--data", small_sketch_root, "--name", "named"))
    assert "head rows put in the data root's class order" in out
    head = read_checkpoint(tmp_path / "checkpoints" / "named" / "00-named" / "model.safetensors").state_dict()
    assert torch.equal(head["head.weight"], expected["fc.weight"].flip(0))
    one_error_line(_invoke(tmp_path, "import", "run.ckpt", "--data", small_sketch_root, "--strip-prefix", "net.",
                           "--name", "wrong"), "no tensor name begins with it")


@pytest.mark.parametrize("layout", ["timm", "timm under module.", "dict with model", "soup"])
def test_plain_state_dicts_in_each_layout(small_sketch_root, tmp_path, layout):
    network = _base()
    state = network.state_dict()
    if layout == "timm under module.":
        state = {f"module.{k}": v for k, v in state.items()}
    if layout == "soup":
        state = {("head." + k[3:] if k.startswith("fc.") else "backbone." + k): v for k, v in state.items()}
    saved = {"model": state, "epoch": 3} if layout == "dict with model" else state
    torch.save(saved, tmp_path / "weights.bin")
    _ok(tmp_path, "import", "weights.bin", "--data", small_sketch_root, "--model", ARCH, "--start", "weights.bin")
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-weights" / "model.safetensors")
    assert checkpoint.meta["imported"]["layout"] == ("soup" if layout == "soup" else "timm")
    images, _ = _val(small_sketch_root)
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(checkpoint)(images), _timm_logits(network.state_dict(), images))


def test_a_timm_checkpoint_file_keeps_its_global_pool(small_sketch_root, tmp_path):
    """One CheckpointSaver file named alone, without args.yaml: its `args` says the model and its --gp,
    which changes the logits and not the tensors."""
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES), global_pool="max")
    args = argparse.Namespace(model=ARCH, num_classes=len(CLASSES), input_size=None, img_size=SIZE, mean=MEAN,
                              std=STD, gp="max", model_kwargs={})
    saver = CheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                            checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(0)
    _ok(tmp_path, "import", "checkpoint-0.pth.tar", "--data", small_sketch_root)
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-checkpoint-0" / "model.safetensors")
    assert checkpoint.recipe["model"]["kwargs"] == {"global_pool": "max"}
    assert checkpoint.meta["imported"]["format"] == "timm train.py checkpoint"
    images, _ = _val(small_sketch_root)
    with torch.no_grad():
        assert torch.allclose(model_from_checkpoint(checkpoint)(images), model.eval()(images), atol=1e-6)


def test_a_torch_hub_backbone_in_soups_layout(small_sketch_root, hub_dir, tmp_path):
    """--model hub:DIR:ENTRY (code the user names runs; a checkpoint never chooses it): soup's layout only."""
    spec = f"hub:{hub_dir}:tiny_dinov2"
    network = build_model(ModelConfig(spec, pretrained=False, kwargs={"img_size": 28}), CLASSES, 28)
    torch.save({"state_dict": network.state_dict()}, tmp_path / "dino.pt")
    # Nothing recorded: the position embedding (2x2 patches of 14 px) says the model is built for 28 px, not the
    # entry's default 518; it says nothing of the size it was fed (DinoV2 interpolates), so that is assumed.
    out = _flat(_ok(tmp_path, "import", "dino.pt", "--data", small_sketch_root, "--model", spec, "--name", "plain"))
    assert "for 28 px (img_size), as dino.pt's position embedding says: 2x2 patches of 14 px" in out
    assert "assumed 224 px" in out and "takes other sizes too" in out and "set --image-size, --mean, --std" in out
    plain = read_checkpoint(tmp_path / "checkpoints" / "plain" / "00-dino" / "model.safetensors")
    assert plain.recipe["model"]["kwargs"] == {"img_size": 28} and plain.recipe["data"]["image_size"] == 224
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in network.state_dict().items())
    hub_folder = tmp_path / "hf"
    hub_folder.mkdir()
    torch.save(network.state_dict(), hub_folder / "pytorch_model.bin")
    (hub_folder / "config.json").write_text(json.dumps({"model_args": {"img_size": 28},
                                                        "pretrained_cfg": {"input_size": [3, 28, 28]}}))
    _ok(tmp_path, "import", hub_folder, "--data", small_sketch_root, "--model", spec)
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "imported" / "00-hf" / "model.safetensors")
    assert checkpoint.backbone == spec and checkpoint.meta["imported"]["layout"] == "soup"
    state = checkpoint.state_dict()
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())
    assert checkpoint.recipe["data"]["image_size"] == 28
    with trusting_hubs([str(hub_dir)]):  # later commands rebuild it only where the user trusts the hub
        rebuilt = model_from_checkpoint(checkpoint)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(images), network.eval()(images))


class _Marker:
    """Unpickling this would write a file: the proof that a checkpoint ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_a_pickle_carrying_code_is_refused_and_runs_nothing(small_sketch_root, tmp_path):
    marker = tmp_path / "marker"
    torch.save({"state_dict": _base().state_dict(), "hook": _Marker(marker)}, tmp_path / "evil.pth")
    with open(tmp_path / "evil.pt", "wb") as f:  # a bare pickle too, not torch's zip
        pickle.dump({"state_dict": {}, "hook": _Marker(marker)}, f)
    for name in ("evil.pth", "evil.pt"):
        result = _invoke(tmp_path, "import", name, "--data", small_sketch_root, "--model", ARCH)
        one_error_line(result, "refused", "nothing in it was run")
    assert not marker.exists()
    assert not (tmp_path / "checkpoints").exists()


def _other_arch_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    other = timm.create_model("test_efficientnet", pretrained=False, num_classes=4)
    timm.models.save_for_hf(other, str(tmp_path / "effnet"), safe_serialization=True)
    return tmp_path / "effnet"


@pytest.mark.parametrize("case", ["two architectures", "wrong --model", "five classes", "no architecture",
                                  "start of another model", "ema without ema", "one source twice"])
def test_misfits_are_one_line_and_write_nothing(runs, small_sketch_root, tmp_path, case):
    shutil.copytree(runs / "run0", tmp_path / "run0")
    torch.save(_base().state_dict(), tmp_path / "plain.pth")
    five = timm.create_model(ARCH, pretrained=False, num_classes=5)
    torch.save(five.state_dict(), tmp_path / "five.pth")
    effnet = _other_arch_folder(tmp_path)
    args, fragments = {
        "two architectures": (["run0", effnet], ["one import, one architecture"]),
        "wrong --model": (["run0", "--model", "test_efficientnet"], ["do not fit timm:test_efficientnet"]),
        "five classes": (["five.pth", "--model", ARCH], ["its head has 5 classes, the data root has 4"]),
        "no architecture": (["plain.pth"], ["records no architecture", "--model"]),
        "start of another model": (["run0", "--start", effnet / "model.safetensors"],
                                   ["--start", "do not fit"]),
        "ema without ema": (["plain.pth", "--model", ARCH, "--ema"], ["no EMA weights"]),
        "one source twice": (["run0", "run0/model_best.pth.tar"], ["are the same checkpoint"]),
    }[case]
    one_error_line(_invoke(tmp_path, "import", *args, "--data", small_sketch_root), *fragments)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_start_is_said_recorded_and_refused_where_needed(runs, small_sketch_root, tmp_path):
    for seed in (0, 2):
        shutil.copytree(runs / f"run{seed}", tmp_path / f"run{seed}")
    out = _ok(tmp_path, "import", "run0", "run2", "--data", small_sketch_root)
    assert "the start is unknown" in _flat(out)
    paths = sorted((tmp_path / "checkpoints" / "imported").glob("*/model.safetensors"))
    meta = read_checkpoint(paths[0]).meta
    assert meta["start"] == {"kind": "unknown", "start_check": "off"} and meta["start_fingerprint"] == "unknown"
    cooked = _ok(tmp_path, "cook", "--uniform", "checkpoints/imported", "-o", "soups/uniform.safetensors")
    assert "shared-start check is off for 2 ingredients" in _flat(cooked)
    for method in (["--stock", "checkpoints/imported"], ["--interpolate", paths[0]]):
        result = _invoke(tmp_path, "cook", *method, "--no-eval", "-o", "soups/x.safetensors")
        one_error_line(result, "imported without its start", "--start")
    assert not (tmp_path / "soups" / "x.safetensors").exists()
    assert "imported without its start" in _flat(_ok(tmp_path, "inspect", "checkpoints/imported"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache, empty: timm's pretrained weights come from here or nowhere."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_start_pretrained_offline_is_one_line(runs, small_sketch_root, tmp_path, hub_cache):
    shutil.copytree(runs / "run0", tmp_path / "run0")
    result = _invoke(tmp_path, "import", "run0", "--data", small_sketch_root, "--start", "pretrained")
    one_error_line(result, "--start pretrained", "--start FILE")
    assert not (tmp_path / "checkpoints").exists()


def test_start_pretrained_is_the_same_start_as_its_file(runs, small_sketch_root, tmp_path, hub_cache):
    """timm's pretrained weights for test_resnet, as the Hub cache holds them, are start.pth's tensors: the
    start rebuilt by name and the start given as a file have one fingerprint, and Model Stock cooks."""
    repo = hub_cache / f"models--timm--{timm.models.get_pretrained_cfg(ARCH).hf_hub_id.split('/')[1]}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    from safetensors.torch import save_file
    save_file(_raw(runs / "start.pth"), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    for seed in (0, 1):
        shutil.copytree(runs / f"run{seed}", tmp_path / f"run{seed}")
    shutil.copy(runs / "start.pth", tmp_path / "start.pth")
    _ok(tmp_path, "import", "run0", "run1", "--data", small_sketch_root, "--start", "pretrained", "--name", "hub")
    _ok(tmp_path, "import", "run0", "--data", small_sketch_root, "--start", "start.pth", "--name", "file")
    by_name = read_checkpoint(tmp_path / "checkpoints" / "hub" / "00-run0" / "model.safetensors")
    by_file = read_checkpoint(tmp_path / "checkpoints" / "file" / "00-run0" / "model.safetensors")
    assert by_name.fingerprint == by_file.fingerprint != "unknown"
    assert by_name.recipe["model"]["pretrained"] is True and by_name.meta["start"]["kind"] == "pretrained"
    _ok(tmp_path, "cook", "--stock", "--no-eval", "checkpoints/hub", "-o", "soups/stock.safetensors")


def test_an_existing_import_is_never_replaced(runs, small_sketch_root, tmp_path):
    shutil.copytree(runs / "run0", tmp_path / "run0")
    _ok(tmp_path, "import", "run0", "--data", small_sketch_root)
    path = tmp_path / "checkpoints" / "imported" / "00-run0" / "model.safetensors"
    before = path.read_bytes()
    one_error_line(_invoke(tmp_path, "import", "run0", "--data", small_sketch_root), "exists already")
    assert path.read_bytes() == before
    assert class_list(small_sketch_root) == CLASSES


def test_hub_cache_folders_become_the_cards_base_model(runs, small_sketch_root, tmp_path):
    """A folder of the Hugging Face cache (models--OWNER--NAME/snapshots/REV, as a Hub download leaves it)
    records its Hub id; a soup exported from such members lists them as base_model."""
    folders = []
    for owner, seed in (("alice", 0), ("bob", 1)):
        folder = tmp_path / "hub" / f"models--{owner}--sketch-resnet" / "snapshots" / ("1" * 40)
        model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
        model.load_state_dict(_raw(runs / f"run{seed}" / "model_best.pth.tar")["state_dict"])
        timm.models.save_for_hf(model, str(folder), safe_serialization=True, model_config={"label_names": CLASSES},
                                data_config={"input_size": (3, SIZE, SIZE), "mean": MEAN, "std": STD})
        folders.append(folder)
    _ok(tmp_path, "import", *folders, "--data", small_sketch_root, "--start", runs / "start.pth")
    paths = sorted((tmp_path / "checkpoints" / "imported").glob("*/model.safetensors"))
    hub_ids = [read_checkpoint(p).meta["imported"]["hub_id"] for p in paths]
    assert hub_ids == ["alice/sketch-resnet", "bob/sketch-resnet"]
    _ok(tmp_path, "cook", "--uniform", "checkpoints/imported", "-o", "soups/uniform.safetensors")
    _ok(tmp_path, "export", "soups/uniform.safetensors", "exported")
    front = yaml.safe_load((tmp_path / "exported" / "README.md").read_text().split("---\n")[1])
    assert front["base_model"] == ["alice/sketch-resnet", "bob/sketch-resnet"]
    assert front["model-index"][0]["results"][0]["dataset"]["name"] == small_sketch_root.resolve().name
