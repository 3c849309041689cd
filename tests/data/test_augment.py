"""soup.data.augment: device-side augmentation of uint8 batches, mixup/cutmix targets and their loss."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from soup.data.augment import (CROP_SCALE, POLICIES, DeviceAugment, Mixer, augment_generator, classification_loss,
                               make_mixer, store_size)
from soup.data.folders import build_transform, load_rgb
from soup.recipe.spec import AUGMENTS, DataConfig, TrainConfig

RANDOM = [a for a in AUGMENTS if a != "none"]


def noise(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def ramps(n, size):
    """Channel 0 rises left to right, channel 1 top to bottom: a crop and a flip can be read off the result."""
    ramp = torch.arange(size, dtype=torch.float32) * 255 / (size - 1)
    image = torch.zeros(3, size, size)
    image[0], image[1] = ramp.view(1, size), ramp.view(size, 1)
    return image.round().to(torch.uint8).expand(n, 3, size, size).contiguous()


def test_store_size_leaves_room_for_crops_only():
    assert store_size("crop_hflip", 224) == 251  # 224 / sqrt(0.8), rounded up
    assert all(store_size(a, 224) == 224 for a in AUGMENTS if a != "crop_hflip")


@pytest.mark.parametrize("augment", AUGMENTS)
def test_output_is_what_the_unaugmented_path_gives_and_input_is_untouched(augment):
    size = 24
    images = noise(8, store_size(augment, size))
    before = images.clone()
    out = DeviceAugment(augment, size)(images, augment_generator(0, 0, 0))
    plain = DeviceAugment("none", size)(noise(8, size), augment_generator(0, 0, 0))
    assert out.shape == plain.shape == (8, 3, size, size) and out.dtype == plain.dtype == torch.uint8
    assert out.device == images.device and torch.equal(images, before)
    with pytest.raises(ValueError, match="expected uint8"):
        DeviceAugment(augment, size)(images.float(), augment_generator(0, 0, 0))


@pytest.mark.parametrize("augment", RANDOM)
def test_each_augmentation_changes_images_per_sample_and_reproducibly(augment):
    size, n = 24, 64
    aug = DeviceAugment(augment, size)
    images = noise(n, aug.store_size)
    out = aug(images, augment_generator(0, 0, 0))
    reference = v2.functional.resize(images, [size, size], antialias=True) if aug.crop else images
    changed = (out != reference).flatten(1).any(1).float().mean()
    assert changed > (0.25 if augment == "hflip" else 0.6)
    # One image repeated: per-sample draws give different results within the batch.
    same = images[:1].expand(16, -1, -1, -1)
    distinct = {tuple(x.flatten()[:4096].tolist()) for x in aug(same, augment_generator(0, 0, 0))}
    assert len(distinct) > 1
    assert torch.equal(aug(images, augment_generator(0, 0, 0)), out)
    assert not torch.equal(aug(images, augment_generator(0, 0, 1)), out)  # another epoch
    assert not torch.equal(aug(images, augment_generator(0, 1, 0)), out)  # another rank


def test_drawing_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    DeviceAugment("randaugment", 16)(noise(4, 16), augment_generator(0, 0, 0))
    assert torch.equal(torch.rand(3), expected)


def test_flip_rate_is_one_half():
    out = DeviceAugment("hflip", 8)(ramps(2000, 8), augment_generator(1, 0, 0))
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert flipped.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(out[flipped], ramps(1, 8).flip(-1).expand(int(flipped.sum()), -1, -1, -1))


def test_crop_scale_and_ratio_stay_in_range_and_spread():
    size, n = 32, 400
    stored = store_size("crop_hflip", size)
    out = DeviceAugment("crop_hflip", size)(ramps(n, stored), augment_generator(0, 0, 0)).float()
    across, down = out[:, 0, size // 2, :], out[:, 1, :, size // 2]
    # A linear ramp resampled stays linear: end-to-end rise x (stored - 1) / 255 spans the crop less a pixel.
    width = (across[:, -1] - across[:, 0]).abs() * (stored - 1) / 255 / (1 - 1 / size)
    height = (down[:, -1] - down[:, 0]).abs() * (stored - 1) / 255 / (1 - 1 / size)
    scale, ratio = width * height / stored ** 2, width / height
    tolerance = 0.04  # a pixel at either end of a 36-pixel store
    assert CROP_SCALE[0] - tolerance <= scale.min() < 0.85 and 0.95 < scale.max() <= CROP_SCALE[1] + tolerance
    assert 3 / 4 - tolerance <= ratio.min() and ratio.max() <= 4 / 3 + tolerance
    assert (across[:, 0] > across[:, -1]).float().mean().item() == pytest.approx(0.5, abs=0.08)


@pytest.mark.parametrize("augment", AUGMENTS)
def test_pil_path_has_the_same_augmentation_and_tensor_shape(sketch_root, augment):
    cfg = DataConfig(root=str(sketch_root), image_size=24, mean=[0.0] * 3, std=[1.0] * 3, augment=augment)
    transform = build_transform(cfg, train=True)
    if augment in POLICIES:
        assert any(isinstance(step, POLICIES[augment]) for step in transform.transforms)
    image = load_rgb(str(next((sketch_root / "train_images" / "circle").iterdir())))
    pil = transform(image)  # ToTensor: float in [0, 1], i.e. uint8 / 255 before normalisation
    stored = v2.functional.resize(v2.functional.pil_to_tensor(image), [store_size(augment, 24)] * 2, antialias=True)
    device = DeviceAugment(augment, 24)(stored[None], augment_generator(0, 0, 0))[0]
    assert pil.shape == device.shape == (3, 24, 24) and device.dtype == torch.uint8
    assert 0.0 <= pil.min() and pil.max() <= 1.0


def test_mixup_and_cutmix_give_soft_targets_with_smoothing_folded_in():
    images = torch.randn(8, 3, 8, 8)
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for mixup, cutmix in ((1.0, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mixer = Mixer(mixup, cutmix, num_classes=4)
        mixed, soft = mixer(images, targets, augment_generator(0, 0, 0))
        assert mixed.shape == images.shape and not torch.equal(mixed, images)
        assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
        assert soft.max() < 1.0 and ((soft > 0).sum(1) == 2).all()  # two classes per row, neither whole
        again = mixer(images, targets, augment_generator(0, 0, 0))
        assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)
    _, smoothed = Mixer(1.0, 0.0, 4, label_smoothing=0.2)(images, targets, augment_generator(0, 0, 0))
    _, plain = Mixer(1.0, 0.0, 4)(images, targets, augment_generator(0, 0, 0))
    assert torch.allclose(smoothed, plain * 0.8 + 0.05) and torch.allclose(smoothed.sum(1), torch.ones(8))
    assert make_mixer(TrainConfig(), 4) is None
    assert make_mixer(TrainConfig(cutmix=1.0, label_smoothing=0.1), 4).label_smoothing == 0.1


def test_loss_with_label_smoothing_and_soft_targets():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 1, 2])
    plain = F.cross_entropy(logits, targets)
    assert torch.equal(classification_loss(logits, targets), plain)
    smoothed = classification_loss(logits, targets, label_smoothing=0.1)
    assert not torch.isclose(smoothed, plain)
    soft = F.one_hot(targets, 4).float() * 0.9 + 0.1 / 4  # what a Mixer hands over for a pure image
    assert torch.isclose(classification_loss(logits, soft, label_smoothing=0.1), smoothed)


@pytest.mark.parametrize("augment", sorted(POLICIES))
def test_batched_policy_equals_torchvisions_transform_image_by_image(augment):
    aug = DeviceAugment(augment, 24)
    images = noise(32, 24, seed=1)
    torch.manual_seed(3)
    batched = aug._policies(images.clone())
    torch.manual_seed(3)  # the same draws, in the same order, through the public transform
    one_by_one = torch.stack([aug.policy(image) for image in images])
    assert torch.equal(batched, one_by_one)


def test_batched_crops_equal_torchvisions_boxes_resized_one_by_one():
    aug = DeviceAugment("crop_hflip", 24)
    images = noise(16, aug.store_size, seed=2)
    torch.manual_seed(4)
    batched = aug._crops(images)
    torch.manual_seed(4)
    boxes = [aug.crop.make_params([image]) for image in images]
    one_by_one = torch.stack([v2.functional.resized_crop(image, b["top"], b["left"], b["height"], b["width"],
                                                         [24, 24], antialias=False)
                              for image, b in zip(images, boxes)])
    difference = (batched.int() - one_by_one.int()).abs()
    # Inside, the same bilinear resampling up to rounding; on the border roi_align reads the stored pixels
    # just outside the box where resized_crop repeats the box's edge.
    assert difference[..., 1:-1, 1:-1].max() <= 1 and difference.float().mean() < 0.5
