"""Random augmentation on the fast path (soup.fast.build): decoded once, augmented per batch on the device,
equal to the PIL path in distribution; reproducible per (seed, rank, epoch); mixup never gets the prefix."""

import numpy as np
import pytest
import torch
from PIL import Image

from soup.data.augment import CROP_SCALE, DeviceAugment, augment_generator, store_size
from soup.data.folders import class_list, load_split
from soup.data.pipeline import epoch_order, plain_pipeline
from soup.fast import decoded as fast_decoded
from soup.fast.build import build_pipeline
from soup.models import distributed
from soup.models.backbones import build_model, freeze_prefix
from soup.recipe.spec import AUGMENTS

from conftest import CLASSES, tiny_vit_model

CPU = torch.device("cpu")
RANDOM = [a for a in AUGMENTS if a != "none"]
UNIT = {"mean": [0.0] * 3, "std": [1.0] * 3}  # normalised = x / 255: pixels can be read back


def setup(recipe):
    classes = class_list(recipe.data.root)
    train_set = load_split(recipe.data, "train", train=True, classes=classes)
    val_set = load_split(recipe.data, "val", classes=classes)
    model = build_model(recipe.model, classes, recipe.data.image_size)
    freeze_prefix(model.backbone, recipe.model.freeze)
    return model, train_set, val_set


def epochs_of(pipeline, epochs):
    return [[(x.clone(), y.clone()) for x, y in pipeline.train_batches(e)] for e in epochs]


@pytest.mark.parametrize("augment", RANDOM)
def test_device_augment_batches_look_like_the_pil_paths(small_sketch_root, make_recipe, augment):
    recipe = make_recipe(small_sketch_root, data={"augment": augment, "image_size": 24}, train={"batch_size": 8})
    model, train_set, val_set = setup(recipe)
    fast = build_pipeline(recipe, model, train_set, val_set, CPU)
    plain = plain_pipeline(recipe, model, train_set, val_set, CPU)
    assert fast.description.startswith("decoded-image cache") and f"{augment} on the cpu per batch" in fast.description
    assert fast.steps_per_epoch == plain.steps_per_epoch
    low = min((0 - m) / s for m, s in zip(recipe.data.mean, recipe.data.std))
    high = max((1 - m) / s for m, s in zip(recipe.data.mean, recipe.data.std))
    for (x_fast, y_fast), (x_plain, y_plain) in zip(fast.train_batches(1), plain.train_batches(1)):
        assert x_fast.shape == x_plain.shape and x_fast.dtype == x_plain.dtype == torch.float32
        assert torch.equal(y_fast, y_plain)  # the same images in the same order, augmented differently
        assert low - 1e-5 <= x_fast.min() and x_fast.max() <= high + 1e-5
    assert fast.evaluate() == plain.evaluate()  # val is never augmented: the decoded val pass is exact


def test_flip_rate_through_the_pipeline(small_sketch_root, make_recipe):
    recipe = make_recipe(small_sketch_root, data={"augment": "hflip"}, train={"batch_size": 8})
    plain_recipe = make_recipe(small_sketch_root, train={"batch_size": 8})
    model, train_set, val_set = setup(recipe)
    fast = build_pipeline(recipe, model, train_set, val_set, CPU)
    reference = build_pipeline(plain_recipe, model, *setup(plain_recipe)[1:], CPU)
    flips = []
    for epoch in range(6):
        for (x, y), (x0, y0) in zip(fast.train_batches(epoch), reference.train_batches(epoch)):
            assert torch.equal(y, y0)
            same, mirrored = (x == x0).flatten(1).all(1), (x == x0.flip(-1)).flatten(1).all(1)
            assert (same | mirrored).all()  # each image is itself or its mirror image, nothing else
            symmetric = (x0 == x0.flip(-1)).flatten(1).all(1)  # a flip that cannot be seen
            flips += (~same)[~symmetric].tolist()
    assert len(flips) > 100 and 0.35 < np.mean(flips) < 0.65


def ramp_data(root, size):
    """Images whose red channel rises left to right and green top to bottom: a crop is read off its pixels."""
    ramp = np.arange(size) * 255 / (size - 1)
    pixels = np.zeros((size, size, 3))
    pixels[..., 0], pixels[..., 1] = ramp[None, :], ramp[:, None]
    image = Image.fromarray(pixels.round().astype(np.uint8))
    for split, count in (("train_images", 12), ("val_images", 1)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image.save(root / split / name / f"{i}.png")
    return root


def crop_statistics(pipeline, epochs, size, stored):
    """(area scale, aspect ratio, flipped) of every crop drawn, read off the ramps."""
    x = torch.cat([x for e in range(epochs) for x, _ in pipeline.train_batches(e)]) * 255
    across, down = x[:, 0, size // 2, :], x[:, 1, :, size // 2]
    width = (across[:, -1] - across[:, 0]).abs() * (stored - 1) / 255 / (1 - 1 / size)
    height = (down[:, -1] - down[:, 0]).abs() * (stored - 1) / 255 / (1 - 1 / size)
    return width * height / stored ** 2, width / height, (across[:, 0] > across[:, -1]).float()


def test_crop_scale_range_matches_the_pil_path(tmp_path, make_recipe):
    size = 32
    stored = store_size("crop_hflip", size)
    root = ramp_data(tmp_path / "ramps", stored)
    recipe = make_recipe(root, data={"augment": "crop_hflip", "image_size": size, **UNIT}, train={"batch_size": 16})
    model, train_set, val_set = setup(recipe)
    fast = build_pipeline(recipe, model, train_set, val_set, CPU)
    assert f"{stored} px (train, for crops) and {size} px (val)" in fast.description
    plain = plain_pipeline(recipe, model, train_set, val_set, CPU)
    tolerance = 0.05  # a pixel at either end of the ramp, and the two resamplers' rounding
    for scale, ratio, flipped in (crop_statistics(p, 4, size, stored) for p in (fast, plain)):
        assert CROP_SCALE[0] - tolerance <= scale.min() < 0.86 and 0.94 < scale.max() <= CROP_SCALE[1] + tolerance
        assert 3 / 4 - tolerance <= ratio.min() and ratio.max() <= 4 / 3 + tolerance
        assert 0.3 < flipped.mean() < 0.7


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ(small_sketch_root, make_recipe):
    recipe = make_recipe(small_sketch_root, data={"augment": "randaugment"}, train={"batch_size": 8})
    model, train_set, val_set = setup(recipe)
    first = epochs_of(build_pipeline(recipe, model, train_set, val_set, CPU), [0, 1])
    resumed = epochs_of(build_pipeline(recipe, model, train_set, val_set, CPU), [1])  # a resumed run's epoch 2
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(first[1], resumed[0]))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first[0], first[1]))


def test_each_rank_draws_its_own_augmentation(small_sketch_root, make_recipe, monkeypatch):
    recipe = make_recipe(small_sketch_root, data={"augment": "hflip"}, train={"batch_size": 4, "seed": 3})
    model, train_set, val_set = setup(recipe)
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(1, 2, 1))
    pipeline = build_pipeline(recipe, model, train_set, val_set, CPU)
    folder, rows = fast_decoded.unwrap(train_set)
    store = fast_decoded.decoded_images(folder, 32)
    normalize = fast_decoded.Normalizer(recipe.data.mean, recipe.data.std, CPU)
    order = torch.as_tensor(distributed.rank_slice(epoch_order(len(rows), 3, 2), 1, 2))
    images = store.images[torch.as_tensor(rows)[order]]
    batches = list(pipeline.train_batches(2))
    assert len(batches) == pipeline.steps_per_epoch and sum(len(y) for _, y in batches) == len(order)
    got = torch.cat([x for x, _ in batches])
    streams = {}
    for rank in (0, 1):
        generator, aug = augment_generator(3, rank, 2), DeviceAugment("hflip", 32)
        streams[rank] = torch.cat([normalize(aug(images[i:i + 4], generator)) for i in range(0, len(images), 4)])
    assert torch.equal(got, streams[1]) and not torch.equal(got, streams[0])


@pytest.mark.parametrize("train, prefix", [({"mixup": 0.2}, False), ({"cutmix": 1.0}, False),
                                           ({"label_smoothing": 0.1}, True)])
def test_mixup_and_cutmix_never_get_the_prefix_cache(small_sketch_root, make_recipe, train, prefix):
    recipe = make_recipe(small_sketch_root, model=tiny_vit_model(freeze=0.75), data={"image_size": 28},
                         train={"batch_size": 8, **train})
    model, train_set, val_set = setup(recipe)
    pipeline = build_pipeline(recipe, model, train_set, val_set, CPU)
    x, _ = next(iter(pipeline.train_batches(0)))
    if prefix:
        assert pipeline.description.startswith("prefix cache") and x.dim() == 3  # tokens
    else:
        assert pipeline.description.startswith("decoded-image cache") and "mixup/cutmix" in pipeline.description
        assert pipeline.model is model and x.shape == (8, 3, 28, 28) and x.dtype == torch.float32
