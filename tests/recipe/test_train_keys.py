"""Issue 12's training keys as `soup train` applies them: label smoothing, the per-step lr schedule, layer
decay, gradient clipping, EMA, mixup, the probed start; and resume across recipe versions."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

import soup.train.schedule
import soup.train.loop
from soup.cook.weights import starting_weights
from soup.data.folders import class_list
from soup.data.pipeline import Pipeline
from soup.errors import SoupError
from soup.models.backbones import build_model, fingerprint
from soup.models.checkpoint import find_checkpoints, read_checkpoint, rewrite_metadata
from soup.models.runs import STATE_FILE
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train import schedule
from soup.train.loop import set_up, train_ingredient
from soup.train.sweep import train_recipe
from soup.train.state import resume_state, save_state

from conftest import tiny_recipe, tiny_vit_model


def quiet() -> Console:
    return Console(file=io.StringIO(), width=300)


def train_one(root, out, console=None, **sections):
    [ingredient] = expand_sweep(recipe_from_dict(tiny_recipe(root, **sections)))
    return read_checkpoint(train_ingredient(ingredient, out, console or quiet()))


def test_label_smoothing_changes_the_loss(small_sketch_root, tmp_path):
    plain = train_one(small_sketch_root, tmp_path / "a")
    smooth = train_one(small_sketch_root, tmp_path / "b", train={"label_smoothing": 0.3})
    assert plain.meta["val_history"][0]["train_loss"] != smooth.meta["val_history"][0]["train_loss"]


def test_cosine_lr_per_epoch_as_trained(small_sketch_root, tmp_path):
    train = {"epochs": 3, "schedule": "cosine", "warmup_epochs": 1.0, "min_lr": 1e-4, "lr": 1e-2}
    checkpoint = train_one(small_sketch_root, tmp_path, train=train)
    t = recipe_from_dict(checkpoint.recipe).train
    steps = math.ceil(24 / t.batch_size)  # 24 train images
    expected = [t.lr * schedule.lr_factor(t, epoch * steps, steps) for epoch in range(3)]
    assert [h["lr"] for h in checkpoint.meta["val_history"]] == pytest.approx(expected, rel=1e-12)
    assert expected[0] < expected[1] and expected[1] > expected[2]  # warm-up, then down


def test_layer_decay_gives_each_layer_its_lr_and_leaves_frozen_ones_out(small_sketch_root, tmp_path):
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.5), data={"image_size": 28},
                                          train={"layer_decay": 0.5, "lr": 1e-2}))
    [ingredient] = expand_sweep(recipe)
    run = set_up(ingredient, tmp_path, quiet(), True, None, "ingredient")
    groups = run.optimizer.param_groups
    # depth 4, freeze 0.5: the embeddings and the first blocks are frozen, so their groups are absent.
    assert [g["name"] for g in groups][-1] == "head" and "embed" not in [g["name"] for g in groups]
    for g in groups:
        layer = 5 if g["name"] == "head" else int(g["name"].removeprefix("block")) + 1
        assert g["lr"] == pytest.approx(1e-2 * 0.5 ** (5 - layer))
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in run.model.parameters() if p.requires_grad}


def test_layer_decay_on_a_convnet_is_one_clear_error(small_sketch_root, tmp_path):
    with pytest.raises(SoupError, match="train.layer_decay: .*set train.layer_decay: null"):
        train_one(small_sketch_root, tmp_path, train={"layer_decay": 0.7})


def test_grad_clip_bounds_the_update(small_sketch_root, tmp_path):
    train = {"optimizer": "sgd", "momentum": 0.0, "lr": 10.0}
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, train=train))
    start = dict(build_model(recipe.model, class_list(small_sketch_root), 32).named_parameters())

    def moved(checkpoint):
        state = checkpoint.state_dict()
        return math.sqrt(sum((state[k] - p.detach()).pow(2).sum().item() for k, p in start.items()))

    steps = math.ceil(24 / 16)
    clipped = moved(train_one(small_sketch_root, tmp_path / "a", train={**train, "grad_clip": 1e-3}))
    assert clipped <= steps * 10.0 * 1e-3 * 1.001  # each SGD step moves lr x (clipped gradient) at most
    assert moved(train_one(small_sketch_root, tmp_path / "b", train=train)) > 10 * clipped


def test_ema_weights_are_saved_and_differ_from_the_raw_ones(small_sketch_root, tmp_path, monkeypatch):
    trained_steps = []
    real_update = soup.train.schedule.EMA.update

    def record(self):
        real_update(self)
        trained_steps.append({n: t.detach().clone() for n, t in zip(self.names, self._live)})

    monkeypatch.setattr(soup.train.schedule.EMA, "update", record)
    train = {"epochs": 2, "ema": 0.6, "lr": 1e-2}
    checkpoint = train_one(small_sketch_root, tmp_path / "ema", train=train)
    recipe = recipe_from_dict(checkpoint.recipe)
    start = build_model(recipe.model, checkpoint.classes, 32).state_dict()
    saved = checkpoint.state_dict()
    for name in trained_steps[0]:
        expected = start[name].float()
        for weights in trained_steps:
            expected = 0.6 * expected + 0.4 * weights[name].float()
        assert torch.allclose(saved[name], expected, atol=1e-6), name
    raw = trained_steps[-1]
    assert any(not torch.equal(saved[n], raw[n].float()) for n in raw)

    # The raw weights score as the same run without EMA; metrics.json records both.
    monkeypatch.undo()
    plain = train_one(small_sketch_root, tmp_path / "plain", train={**train, "ema": None})
    metrics = json.loads((checkpoint.path.parent / "metrics.json").read_text())
    assert metrics["raw_val_acc"] == plain.meta["val_acc"]
    assert metrics["val_acc"] == checkpoint.meta["val_history"][-1]["val_top1"]
    assert all("raw_val_top1" in h for h in metrics["val_history"])


def test_mixup_mixes_the_targets_in_training(small_sketch_root, tmp_path, monkeypatch):
    seen = []
    real = soup.train.loop.classification_loss

    def record(logits, targets, label_smoothing=0.0):
        seen.append(targets.detach().clone())
        return real(logits, targets, label_smoothing)

    monkeypatch.setattr(soup.train.loop, "classification_loss", record)
    train_one(small_sketch_root, tmp_path, train={"mixup": 0.4, "label_smoothing": 0.1})
    assert seen and all(t.is_floating_point() and t.dim() == 2 for t in seen)
    assert torch.allclose(seen[0].sum(1), torch.ones(len(seen[0])))
    assert seen[0].max() < 0.99  # smoothed and mixed: no row is one-hot


def test_mixup_on_features_instead_of_images_is_one_clear_error(small_sketch_root, tmp_path, monkeypatch):
    real = soup.train.loop.build_pipeline

    def features(*args, **kwargs):
        p = real(*args, **kwargs)
        return Pipeline(p.model, lambda epoch: ((x.flatten(2), y) for x, y in p.train_batches(epoch)), p.evaluate,
                        p.steps_per_epoch, "a feature cache")

    monkeypatch.setattr(soup.train.loop, "build_pipeline", features)
    with pytest.raises(SoupError, match=r"train.mixup/train.cutmix mix images, but the data path \(a feature cache\)"):
        train_one(small_sketch_root, tmp_path, train={"cutmix": 1.0})


def probe_recipe(root, **extra):
    return tiny_recipe(root, model=tiny_vit_model(freeze=0.5, probe={"epochs": 2, "lr": 1e-2}),
                       data={"image_size": 28}, sweep={"train.seed": [0, 1]}, **extra)


def test_the_probe_trains_the_head_once_for_all_ingredients(small_sketch_root, tmp_path):
    recipe = recipe_from_dict(probe_recipe(small_sketch_root))
    console = quiet()
    results = train_recipe(recipe, tmp_path, console=console)
    said = console.file.getvalue()
    [probe_dir] = [p for p in (tmp_path / "tiny").iterdir() if p.name.startswith("probe-")]
    probe = read_checkpoint(probe_dir / "model.safetensors")
    assert probe.kind == "probe" and said.count("parameters train") == 3  # the probe, then 2 ingredients
    assert f"probed start {probe_dir.name}: frozen backbone + linear head, val acc" in said
    # Trained for the first ingredient, reused by the second, without a "skipped" line of its own.
    assert said.count("(trained earlier, reused)") == 1 and "finished already" not in said

    # Only the head trained: the backbone is the recipe's start, the head is not.
    start = build_model(recipe.model, probe.classes, 28).state_dict()
    weights = probe.state_dict()
    assert all(torch.equal(weights[k], start[k]) for k in start if k.startswith("backbone."))
    assert not torch.equal(weights["head.weight"], start["head.weight"])

    # One start for every ingredient: backbone + probed head, and cooking rebuilds it.
    ingredients = [read_checkpoint(path) for _, path in results]
    probed = build_model(recipe.model, probe.classes, 28)
    probed.load_state_dict(weights)
    assert {c.fingerprint for c in ingredients} == {fingerprint(probed)}
    assert all(c.meta["probe"]["id"] == probe_dir.name for c in ingredients)
    rebuilt = starting_weights(ingredients[0])
    assert torch.equal(rebuilt["head.weight"], weights["head.weight"])
    assert [c.path for c in find_checkpoints([tmp_path])] == [c.path for c in ingredients]  # not the probe

    # Reused, not retrained: another process for one ingredient, and a new sweep value, start from it.
    before = (probe_dir / "model.safetensors").stat().st_mtime_ns
    more = probe_recipe(small_sketch_root)
    more["sweep"] = {"train.seed": [0, 1, 2]}
    train_recipe(recipe_from_dict(more), tmp_path, index=2, console=(console := quiet()))
    assert (probe_dir / "model.safetensors").stat().st_mtime_ns == before
    assert console.file.getvalue().count("parameters train") == 1

    # Cooking without the probe beside the ingredients is one clear error.
    (probe_dir / "model.safetensors").unlink()
    with pytest.raises(SoupError, match="started from the probed start .*which is missing"):
        starting_weights(ingredients[0])


def test_resume_accepts_a_checkpoint_from_before_new_recipe_keys(small_sketch_root, tmp_path):
    checkpoint = train_one(small_sketch_root, tmp_path)
    meta = dict(checkpoint.meta)
    old = json.loads(json.dumps(meta["recipe"]))
    for key in ("label_smoothing", "ema", "mixup", "schedule"):
        del old["train"][key]  # as written by soup before these keys existed
    rewrite_metadata(checkpoint.path, {**meta, "recipe": old})
    [ingredient] = expand_sweep(recipe_from_dict(tiny_recipe(small_sketch_root)))
    console = quiet()
    train_ingredient(ingredient, tmp_path, console, resume=True)
    assert "finished already, skipped" in console.file.getvalue()


def test_a_saved_state_resumes_across_recipe_versions_but_not_across_schedule_formats(small_sketch_root, tmp_path):
    recipe = recipe_from_dict(tiny_recipe(small_sketch_root))
    old = json.loads(json.dumps(recipe.to_dict()))
    del old["train"]["ema"], old["model"]["probe"]  # a state written before these keys existed
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule_ = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = tmp_path / STATE_FILE
    save_state(path, model, optimizer, scaler, schedule_, 1, [], {"recipe": old, "start_fingerprint": "f"})
    meta = {"recipe": recipe.to_dict(), "start_fingerprint": "f"}
    assert resume_state(path, meta, model, optimizer, scaler, schedule_)["epoch"] == 1
    with pytest.raises(SoupError, match="different recipe or start"):
        resume_state(path, {**meta, "start_fingerprint": "g"}, model, optimizer, scaler, schedule_)
    state = torch.load(path, weights_only=True)
    del state["format"]  # soup before the schedule stepped per optimizer step
    torch.save(state, path)
    with pytest.raises(SoupError, match="saved by an older version of soup .*delete it to start over"):
        resume_state(path, meta, model, optimizer, scaler, schedule_)
