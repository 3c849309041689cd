"""Fast data paths (soup.fast): exact where used, rebuilt when stale, never used where invalid."""

import shutil

import pytest
import torch
from rich.console import Console

from soup.cook.selector import Selector
from soup.cook.weights import weighted_average
from soup.data.folders import class_list, load_split
from soup.data.pipeline import plain_pipeline
from soup.fast import decoded as fast_decoded, prefix as fast_prefix, store as fast_store
from soup.fast.build import build_pipeline
from soup.models.backbones import build_model, freeze_prefix
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import expand_sweep
from soup.train.loop import train_ingredient

from conftest import CLASSES, tiny_vit_model

quiet = Console(quiet=True)
BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: relative rounding error up to 2^-9, say 2^-8


@pytest.fixture
def data_copy(small_sketch_root, tmp_path):
    """A private copy of the sketches, so tests may change files and their cache."""
    root = tmp_path / "data"
    shutil.copytree(small_sketch_root, root, ignore=shutil.ignore_patterns(".soup_cache"))
    return root


def setup(recipe, device=torch.device("cpu")):
    classes = class_list(recipe.data.root)
    train_set = load_split(recipe.data, "train", train=True, classes=classes)
    val_set = load_split(recipe.data, "val", classes=classes)
    model = build_model(recipe.model, classes, recipe.data.image_size)
    freeze_prefix(model.backbone, recipe.model.freeze)
    return model.to(device), train_set, val_set


def vit_recipe(make_recipe, root, **train):
    return make_recipe(root, model=tiny_vit_model(freeze=0.75), data={"image_size": 28},
                       train={"optimizer": "sgd", "lr": 0.05, "batch_size": 8, **train})


def test_prefix_batches_and_logits_match_plain_within_bf16(small_sketch_root, make_recipe):
    recipe = vit_recipe(make_recipe, small_sketch_root)
    model, train_set, val_set = setup(recipe)
    fast = build_pipeline(recipe, model, train_set, val_set, torch.device("cpu"))
    plain = plain_pipeline(recipe, model, train_set, val_set, torch.device("cpu"))
    assert fast.description.startswith("prefix cache: 2 blocks") and fast.steps_per_epoch == plain.steps_per_epoch
    model.train()  # DinoV2's ViT has no dropout: train mode computes what the cached (eval) prefix did
    for epoch in (0, 1):
        for (tokens, y_fast), (images, y_plain) in zip(fast.train_batches(epoch), plain.train_batches(epoch)):
            assert torch.equal(y_fast, y_plain)  # same seed, same batches
            with torch.no_grad():
                a, b = fast.model(tokens), model(images)
            assert (a - b).abs().max() <= 4 * BF16_EPS * b.abs().max()
    f, p = fast.evaluate(), plain.evaluate()
    assert f["n"] == p["n"] and f["top1"] == p["top1"] and f["loss"] == pytest.approx(p["loss"], rel=1e-2)


def test_cached_training_matches_plain_training(small_sketch_root, tmp_path, make_recipe):
    recipe = vit_recipe(make_recipe, small_sketch_root, epochs=2)
    [ingredient] = expand_sweep(recipe)
    fast = read_checkpoint(train_ingredient(ingredient, tmp_path / "fast", quiet))
    plain = read_checkpoint(train_ingredient(ingredient, tmp_path / "plain", quiet, use_cache=False))
    metrics = (tmp_path / "fast" / "tiny" / "00" / "metrics.json").read_text()
    assert "prefix cache" in metrics
    a, b = fast.state_dict(), plain.state_dict()
    start = build_model(recipe.model, CLASSES, 28).state_dict()
    for key in a:
        moved = (b[key] - start[key]).abs().max()
        # frozen tensors identical; trained ones differ by bf16 rounding of the cached tokens, far less
        # than the training moved them
        assert (a[key] - b[key]).abs().max() <= 0.05 * moved + 1e-6, key
    for h_fast, h_plain in zip(fast.meta["val_history"], plain.meta["val_history"]):
        assert h_fast["train_loss"] == pytest.approx(h_plain["train_loss"], rel=1e-2)
        assert h_fast["val_loss"] == pytest.approx(h_plain["val_loss"], rel=1e-2)


def test_decoded_batches_are_bit_identical_for_a_resnet(small_sketch_root, make_recipe):
    recipe = make_recipe(small_sketch_root, model={"freeze": 0.5})
    model, train_set, val_set = setup(recipe)
    fast = build_pipeline(recipe, model, train_set, val_set, torch.device("cpu"))
    plain = plain_pipeline(recipe, model, train_set, val_set, torch.device("cpu"))
    assert fast.description.startswith("decoded-image cache") and "not a ViT" in fast.description
    for (x_fast, y_fast), (x_plain, y_plain) in zip(fast.train_batches(3), plain.train_batches(3)):
        assert torch.equal(x_fast, x_plain) and torch.equal(y_fast, y_plain)
    assert fast.evaluate() == plain.evaluate()


def test_augmentation_takes_the_decoded_path_and_no_cache_the_plain_one(small_sketch_root, make_recipe):
    recipe = make_recipe(small_sketch_root, data={"augment": "hflip"})
    model, train_set, val_set = setup(recipe)
    description = build_pipeline(recipe, model, train_set, val_set, torch.device("cpu")).description
    assert description.startswith("decoded-image cache") and "hflip on the cpu per batch" in description
    no_cache = build_pipeline(make_recipe(small_sketch_root), model, train_set, val_set, torch.device("cpu"),
                              use_cache=False)
    assert no_cache.description.startswith("plain") and "--no-cache" in no_cache.description


def test_decoded_store_rebuilt_when_a_file_changes_or_the_store_is_damaged(data_copy, make_recipe):
    recipe = make_recipe(data_copy)
    folder, _ = fast_decoded.unwrap(load_split(recipe.data, "train", classes=class_list(data_copy)))
    fast_decoded._DECODED.clear()  # a copy has the same key (names, sizes, mtimes) as its original
    first = fast_decoded.decoded_images(folder, 32)
    assert first.built and first.path.parent == data_copy / ".soup_cache"
    fast_decoded._DECODED.clear()
    again = fast_decoded.decoded_images(folder, 32)
    assert not again.built and torch.equal(again.images, first.images)

    # A changed image (new size and mtime) is a new key: rebuilt, and the stale store removed.
    from PIL import Image

    changed = folder.samples[0][0]
    Image.new("RGB", (40, 40), "black").save(changed)
    folder2, _ = fast_decoded.unwrap(load_split(recipe.data, "train", classes=class_list(data_copy)))
    rebuilt = fast_decoded.decoded_images(folder2, 32)
    assert rebuilt.built and rebuilt.key != first.key and not first.path.exists()
    assert rebuilt.images[0].max() == 0 and torch.equal(rebuilt.images[1:], first.images[1:])

    expected = rebuilt.images.clone()  # the store is a map of the file we are about to damage
    for damage in ("flip", "truncate", "header"):
        fast_decoded._DECODED.clear()
        raw = bytearray(rebuilt.path.read_bytes())
        if damage == "flip":
            raw[-7] ^= 0xFF
        elif damage == "truncate":
            raw = raw[:-100]
        else:
            raw[:8] = b"garbage!"
        rebuilt.path.write_bytes(bytes(raw))
        assert fast_store.open_store(rebuilt.path, rebuilt.key) is None
        fixed = fast_decoded.decoded_images(folder2, 32)
        assert fixed.built and torch.equal(fixed.images, expected), damage


def test_sweep_shares_features_and_disk_store_is_verified(data_copy, tmp_path, make_recipe, monkeypatch):
    recipe = vit_recipe(make_recipe, data_copy, epochs=1)
    model, train_set, val_set = setup(recipe)
    fast_prefix._FEATURES.clear()  # a copy of the data has its original's key: start from nothing
    memory = build_pipeline(recipe, model, train_set, val_set, torch.device("cpu"))
    assert "(computed now)" in memory.description
    model2, *_ = setup(recipe)  # the next ingredient: same start, same k
    assert "shared with an earlier run" in build_pipeline(recipe, model2, train_set, val_set,
                                                          torch.device("cpu")).description

    monkeypatch.setenv(fast_prefix.FEATURE_STORE_ENV, "disk")
    fast_prefix._FEATURES.clear()
    disk = build_pipeline(recipe, model, train_set, val_set, torch.device("cpu"))
    assert "memory map" in disk.description
    for (a, _), (b, _) in zip(memory.train_batches(0), disk.train_batches(0)):
        assert torch.equal(a, b)
    [store] = (data_copy / ".soup_cache").glob("prefix-train_images-*.bin")
    raw = bytearray(store.read_bytes())
    raw[-3] ^= 0x55
    store.write_bytes(bytes(raw))
    fast_prefix._FEATURES.clear()
    assert "(computed now)" in build_pipeline(recipe, model, train_set, val_set,
                                              torch.device("cpu")).description


def test_dropout_in_the_prefix_means_no_prefix_cache(small_sketch_root, make_recipe):
    recipe = make_recipe(small_sketch_root, data={"image_size": 28},
                         model=tiny_vit_model(freeze=0.75, kwargs={"img_size": 28, "depth": 4, "embed_dim": 32,
                                                                    "num_heads": 2, "drop_path_rate": 0.2}))
    model, train_set, val_set = setup(recipe)
    description = build_pipeline(recipe, model, train_set, val_set, torch.device("cpu")).description
    assert description.startswith("decoded-image cache") and "train mode" in description


def test_partly_frozen_block_runs_in_the_suffix(small_sketch_root, make_recipe):
    recipe = vit_recipe(make_recipe, small_sketch_root)
    model, *_ = setup(recipe)
    model.backbone.blocks[1].mlp.fc2.weight.requires_grad_(True)
    split, _ = fast_prefix.find_prefix(model.backbone)
    assert split.k == 1
    model.backbone.patch_embed.proj.weight.requires_grad_(True)
    assert fast_prefix.find_prefix(model.backbone) == (None, "the patch embedding trains")


def test_selector_through_the_cache_agrees_with_plain_evaluation(small_sketch_root, tmp_path, make_recipe):
    recipe = vit_recipe(make_recipe, small_sketch_root, epochs=1)
    recipe.sweep = {"train.seed": [0, 1]}
    ingredients = [read_checkpoint(train_ingredient(i, tmp_path, quiet)) for i in expand_sweep(recipe)]
    fast = Selector(ingredients[0], "val")
    plain = Selector(ingredients[0], "val", use_cache=False)
    assert fast.cached.description.startswith("prefix cache") and plain.cached is None
    assert (fast.split, fast.root) == (plain.split, plain.root)
    soup = weighted_average([(c, 0.5) for c in ingredients])
    for state in [c.state_dict() for c in ingredients] + [soup]:
        f, p = fast(state), plain(state)
        assert fast.cached.prefix_unchanged()  # the average's prefix is the shared one: suffix only
        assert f["n"] == p["n"] and f["top1"] == p["top1"] and f["top5"] == p["top5"]
        assert f["loss"] == pytest.approx(p["loss"], rel=1e-2)
    # Weights from another start: the prefix differs, so the scorer takes the full forward, exactly.
    other = {k: v + 0.01 if k.startswith("backbone.patch_embed") else v for k, v in soup.items()}
    f, p = fast(other), plain(other)
    assert not fast.cached.prefix_unchanged() and f["loss"] == pytest.approx(p["loss"], rel=1e-5)


def test_selector_on_a_holdout_slice_computes_only_that_slice(small_sketch_root, tmp_path, make_recipe):
    recipe = make_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.75),
                         data={"image_size": 28, "holdout": 0.3}, train={"batch_size": 8})
    [ingredient] = expand_sweep(recipe)
    checkpoint = read_checkpoint(train_ingredient(ingredient, tmp_path, quiet))
    fast_prefix._FEATURES.clear()  # as in a fresh `soup cook` process
    fast = Selector(checkpoint, "holdout")
    plain = Selector(checkpoint, "holdout", use_cache=False)
    features = fast.cached.features
    assert features.lookup is not None and len(features.tokens) == len(plain.loader.dataset) < 24
    f, p = fast(checkpoint.state_dict()), plain(checkpoint.state_dict())
    assert f["n"] == p["n"] and f["top1"] == p["top1"] and f["loss"] == pytest.approx(p["loss"], rel=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefix_cache_on_gpu_matches_plain(small_sketch_root, make_recipe):
    recipe = vit_recipe(make_recipe, small_sketch_root, amp="fp16")
    device = torch.device("cuda")
    model, train_set, val_set = setup(recipe, device)
    fast = build_pipeline(recipe, model, train_set, val_set, device)
    plain = plain_pipeline(recipe, model, train_set, val_set, device)
    assert fast.description.startswith("prefix cache") and "cuda" in fast.description
    model.train()
    for (tokens, y_fast), (images, y_plain) in zip(fast.train_batches(0), plain.train_batches(0)):
        assert torch.equal(y_fast, y_plain)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = fast.model(tokens).float(), model(images).float()
        assert (a - b).abs().max() <= 16 * BF16_EPS * b.abs().max()
    assert fast.evaluate()["top1"] == pytest.approx(plain.evaluate()["top1"], abs=0.1)


class DinoLike(torch.nn.Module):
    """The facebookresearch/dinov2 hub model's layout (prepare_tokens_with_masks, blocks, norm, head,
    mask_token), optionally with its chunked blocks, built from timm's blocks."""

    def __init__(self, depth=4, dim=32, chunks=0):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        self.patch_embed = PatchEmbed(28, 14, 3, dim)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        blocks = [Block(dim, 2, init_values=1e-5) for _ in range(depth)]
        if chunks:
            per = depth // chunks
            blocks = [torch.nn.ModuleList([torch.nn.Identity()] * (i * per) + blocks[i * per:(i + 1) * per])
                      for i in range(chunks)]
        self.blocks = torch.nn.ModuleList(blocks)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Identity()
        self.mask_token = torch.nn.Parameter(torch.zeros(1, dim))

    def prepare_tokens_with_masks(self, x, masks=None):
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed

    def forward(self, x):
        x = self.prepare_tokens_with_masks(x)
        for chunk in self.blocks:
            for block in (chunk if isinstance(chunk, torch.nn.ModuleList) else [chunk]):
                x = block(x)
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize("chunks", [0, 2])
def test_dinov2_hub_layout_splits_exactly(chunks):
    backbone = DinoLike(chunks=chunks)
    freeze_prefix(backbone, 0.6)
    split, why = fast_prefix.find_prefix(backbone)
    assert split is not None and split.kind == "dinov2" and split.k >= 1, why
    assert fast_prefix.split_matches(split, torch.randn(3, 3, 28, 28))
    assert "mask_token" not in split.prefix_names() and len(split.prefix_names()) == len(split.prefix_state())


def test_cli_reports_the_path_and_no_cache_turns_it_off(small_sketch_root, tmp_path, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from conftest import tiny_recipe
    from soup.cli import cli

    monkeypatch.chdir(tmp_path)
    raw = tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.75), data={"image_size": 28})
    (tmp_path / "vit.yaml").write_text(yaml.safe_dump(raw))
    fast = CliRunner().invoke(cli, ["train", "vit.yaml", "--out", "a"])
    plain = CliRunner().invoke(cli, ["train", "vit.yaml", "--out", "b", "--no-cache"])
    assert fast.exit_code == 0 and plain.exit_code == 0, fast.output + plain.output
    assert "data path: prefix cache: 2 blocks" in " ".join(fast.output.split())
    assert "data path: plain" in plain.output


def test_eval_through_the_caches_matches_plain_eval(small_sketch_root, tmp_path):
    """`soup eval` shares decoded images / prefix features across checkpoints; the figures stay the same."""
    from conftest import tiny_recipe, tiny_vit_model

    from soup.models.checkpoint import read_checkpoint
    from soup.cook.cooking import cook
    from soup.score.evaluator import Evaluator
    from soup.judge.evaluate import eval_rows
    from soup.recipe.spec import expand_sweep, recipe_from_dict
    from soup.train.loop import train_ingredient

    recipe = recipe_from_dict(tiny_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.5),
                                          data={"image_size": 28}, sweep={"train.seed": [0, 1]}))
    ingredients = [read_checkpoint(train_ingredient(i, tmp_path, use_cache=False)) for i in expand_sweep(recipe)]
    soup = read_checkpoint(cook("uniform", ingredients, tmp_path / "u.safetensors", None))
    everything = ingredients + [soup]
    cached_eval = Evaluator("val")
    cached = eval_rows(everything, cached_eval, ensemble=True)
    plain = eval_rows(everything, Evaluator("val", use_cache=False), ensemble=True)
    assert any(s is not None and s.features is not None for s in cached_eval._scorers.values())
    for a, b in zip(cached, plain):
        assert a["name"] == b["name"] and a["n"] == b["n"]
        assert abs(a["top1"] - b["top1"]) <= 1 / a["n"] + 1e-9  # bf16 prefix features: at most one flip
        assert a["loss"] == pytest.approx(b["loss"], abs=0.02)
