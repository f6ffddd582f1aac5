"""Augmentations: warps match their parameters, targets match the transform applied,
permutations are permutations."""


import numpy as np
import pytest

from metalearn.core.config import ConfigError
from tasks import augment
from tasks.augment import AugmentConfig


def _images(n=6, size=14, channels=1, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_quarter_turns_and_shifts_are_exact(interpolation):
    x = _images(3)
    zero = np.zeros((3, 2), int)
    for bins, k in ((90, -1), (180, 2), (270, 1), (0, 0)):
        out = augment.warp(x, np.full(3, bins), zero, interpolation=interpolation)
        np.testing.assert_allclose(out, np.rot90(x, k, axes=(1, 2)), atol=1e-5)
    out = augment.warp(x, np.zeros(3, int), np.array([[2, -3]] * 3),
                       interpolation=interpolation)
    expected = np.zeros_like(x)
    expected[:, :14 - 3, 2:] = x[:, 3:, :14 - 2]  # dx = +2 (right), dy = -3 (up), zero fill
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_colour_channels_warp_together():
    x = _images(2, 16, 3)
    out = augment.warp(x, np.array([90, 90]), np.zeros((2, 2), int))
    np.testing.assert_allclose(out, np.rot90(x, -1, axes=(1, 2)), atol=1e-6)


def _task_augment(config, num_classes=4, dim=196, permute=False, seed=0):
    return augment.draw(config, np.random.default_rng(seed), num_classes=num_classes,
                        dim=dim, is_image=True, permute_inputs=permute, num_premade=10,
                        premade_seed=0)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_geometric_targets_match_the_transform_applied(interpolation):
    aug = _task_augment(AugmentConfig(geometric_prob=1.0, x_shift_prob=1.0,
                                      interpolation=interpolation))
    assert aug.target_names == ["sin_rotation", "cos_rotation", "shift_x", "shift_y",
                                "x_shift"]
    x = _images(64)
    labels = np.zeros(64, int)
    out, targets = augment.apply(aug, x, labels, np.random.default_rng(5), True)
    assert targets.shape == (64, 5)
    angle = np.rad2deg(np.arctan2(targets[:, 0], targets[:, 1]))
    bins = np.mod(np.round(angle), 360).astype(int)
    dx = np.round(targets[:, 2] * aug.max_shift + targets[:, 4] * aug.max_x_shift).astype(int)
    dy = np.round(targets[:, 3] * aug.max_shift).astype(int)
    assert len(set(bins)) > 10 and len(set(dx)) > 3  # parameters really vary
    rebuilt = augment.warp(x, bins, np.stack([dx, dy], 1),
                           interpolation=aug.interpolation).reshape(64, -1)
    np.testing.assert_allclose(out, rebuilt, atol=1e-6)
    np.testing.assert_allclose(targets[:, 0] ** 2 + targets[:, 1] ** 2, 1.0, rtol=1e-5)
    assert np.abs(targets[:, 2:]).max() <= 1.0


def test_example_dropout_target_is_the_rate_applied():
    aug = _task_augment(AugmentConfig(example_dropout_prob=1.0, example_dropout_max=0.9),
                        dim=1600)
    x = np.ones((200, 40, 40, 1), np.float32)
    out, targets = augment.apply(aug, x, np.zeros(200, int), np.random.default_rng(0), True)
    dropped = (out == 0).mean(axis=1)
    np.testing.assert_allclose(dropped, targets[:, 0] * 0.9, atol=0.05)


def test_task_dropout_is_one_mask_for_the_task():
    aug = _task_augment(AugmentConfig(task_dropout_prob=1.0))
    assert aug.num_targets == 0 and aug.task_mask is not None
    out, _ = augment.apply(aug, np.ones((5, 14, 14, 1), np.float32), np.zeros(5, int),
                           np.random.default_rng(0), True)
    np.testing.assert_array_equal(out, np.broadcast_to(aug.task_mask, out.shape))


def test_permutations_are_permutations():
    premade = augment.premade_permutations(196, 10, 0)
    assert premade.shape == (10, 196)
    for row in premade:
        np.testing.assert_array_equal(np.sort(row), np.arange(196))
    np.testing.assert_array_equal(premade, augment.premade_permutations.__wrapped__(196, 10, 0))
    aug = _task_augment(AugmentConfig(class_permutation_prob=1.0), num_classes=4, permute=True)
    assert aug.feature_index.shape == (4, 196)
    for row in aug.feature_index:
        np.testing.assert_array_equal(np.sort(row), np.arange(196))
    # Same class -> same permutation; the task permutation is shared by every class.
    x = _images(8).reshape(8, 14, 14, 1)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    out, _ = augment.apply(aug, x, labels, np.random.default_rng(0), True)
    flat = x.reshape(8, -1)
    for i, c in enumerate(labels):
        np.testing.assert_array_equal(out[i], flat[i, aug.feature_index[c]])
    only_task = _task_augment(AugmentConfig(), permute=True)
    assert only_task.feature_index.shape == (1, 196)
    np.testing.assert_array_equal(np.sort(only_task.feature_index[0]), np.arange(196))


def test_vectors_skip_geometric_augmentation():
    aug = augment.draw(AugmentConfig(geometric_prob=1.0, x_shift_prob=1.0),
                       np.random.default_rng(0), num_classes=2, dim=2, is_image=False,
                       permute_inputs=True, num_premade=4, premade_seed=0)
    assert not aug.geometric and not aug.x_shift and aug.num_targets == 0


def test_bad_config():
    with pytest.raises(ConfigError, match="geometric_prob"):
        AugmentConfig(geometric_prob=1.5)
    with pytest.raises(ConfigError, match="interpolation"):
        AugmentConfig(interpolation="cubic")


@pytest.mark.parametrize("channels,interpolation", [(1, "nearest"), (3, "nearest"),
                                                    (1, "bilinear"), (3, "bilinear")])
def test_folded_gather_equals_warp_mask_then_permute(channels, interpolation):
    """assemble() does everything in one gather; check it against the plain pipeline."""
    size, n = 16, 40
    config = AugmentConfig(geometric_prob=1.0, x_shift_prob=1.0, task_dropout_prob=1.0,
                           class_permutation_prob=1.0, interpolation=interpolation)
    aug = _task_augment(config, num_classes=3, dim=size * size * channels, permute=True)
    data = np.random.default_rng(1).integers(0, 256, (100, size, size, channels)).astype(np.uint8)
    ids = np.random.default_rng(2).integers(0, 100, n)
    labels = np.arange(n) % 3
    scale = lambda v: v.astype(np.float32) / 255  # noqa: E731
    out, targets = augment.assemble(aug, data, ids, labels, np.random.default_rng(3), True,
                                    scale=scale)
    bins = np.mod(np.round(np.rad2deg(np.arctan2(targets[:, 0], targets[:, 1]))), 360)
    dx = np.round(targets[:, 2] * aug.max_shift + targets[:, 4] * aug.max_x_shift)
    dy = np.round(targets[:, 3] * aug.max_shift)
    warped = augment.warp(scale(data[ids]), bins.astype(int),
                          np.stack([dx, dy], 1).astype(int), interpolation=interpolation)
    flat = warped.reshape(n, -1) * aug.task_mask
    expected = np.stack([flat[i, aug.feature_index[labels[i]]] for i in range(n)])
    np.testing.assert_allclose(out, expected, atol=1e-5)
