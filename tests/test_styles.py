"""Flagged 1s drawn into the training digits (`styles`), and where a recipe applies them."""

from __future__ import annotations

import numpy as np
import pytest

from cnnmnist import presets, training
from cnnmnist.training import steps, styles

INDEX = np.arange(28)


def column_of_mass(image: np.ndarray) -> float:
    return float(image.sum(axis=0) @ INDEX / image.sum())


def unflagged(out: np.ndarray, one: np.ndarray) -> np.ndarray:
    """The flagged image moved back by the centring shift: the one under which every pixel of
    the 1 lies under the flagged image's."""
    return next(b for k in range(-6, 7) if ((b := np.roll(out, k, axis=1)) >= one).all())


def test_a_flag_leaves_the_top_of_a_1_down_to_the_left_and_never_level():
    rng = np.random.default_rng(0)
    for slant in (-0.3, -0.15, 0.0, 0.15, 0.3):  # columns per row, within MAX_SLANT
        top, bottom = np.array([4.0, 14 - 10 * slant]), np.array([24.0, 14 + 10 * slant])
        one = np.round(styles.stroke(top, bottom, 2.5) * 255).astype(np.uint8)
        for _ in range(20):
            out = styles.flagged_one(one, rng)
            assert out.dtype == np.uint8 and out.shape == (28, 28)
            assert abs(column_of_mass(out) - column_of_mass(one)) <= 0.5 + 1e-9
            new = (unflagged(out, one).astype(float) - one).clip(0)
            new[14:] = 0  # a foot, if any, is at the bottom
            # The flag's middle, from where it leaves the stem (the stroke's end; its round
            # cap is the 1's top row).
            middle = np.array([new.sum(axis=1) @ INDEX, new.sum(axis=0) @ INDEX]) / new.sum()
            down, across = middle - top
            assert -across > 1  # left of the stem ...
            # ... and down, never level (a level bar would make a 7), nor along the stem.
            assert 30 < np.degrees(np.arctan2(down, -across)) < 70
            assert np.hypot(across, down) < 0.4 * 21  # short: the 1 is 21 rows high


def test_flagged_mnist_1s_keep_their_ink_and_their_place(mnist):
    ones = mnist.train_images[mnist.train_labels == 1][:200]
    rng = np.random.default_rng(0)
    flagged = [(one, styles.flagged_one(one, rng)) for one in ones]
    flagged = [(one, out) for one, out in flagged if out is not None]
    assert len(flagged) > 100  # most 1s are upright enough to take a flag
    for one, out in flagged:
        assert abs(column_of_mass(out) - column_of_mass(one)) <= 0.5 + 1e-9
        rows = np.flatnonzero((one > 76).any(axis=1))
        upper = slice(0, (rows[0] + rows[-1]) // 2)  # the flag; a foot is lower down
        new = (unflagged(out, one).astype(float) - one).clip(0)[upper]
        if new.sum() > 255:  # a 1 that had a flag of its own gains little
            assert column_of_mass(new) < column_of_mass(one[upper])  # left of the stem


def test_a_1_slanted_like_a_7_stroke_is_not_flagged():
    rng = np.random.default_rng(0)
    for slant in (0.5, -0.5, 0.8):  # columns per row, about 27-39 degrees from upright
        start, end = np.array([4.0, 14 - 10 * slant]), np.array([24.0, 14 + 10 * slant])
        one = np.round(styles.stroke(start, end, 2.5) * 255).astype(np.uint8)
        assert styles.flagged_one(one, rng) is None
    upright = np.round(styles.stroke(np.array([4.0, 14]), np.array([24.0, 14]), 2.5) * 255)
    assert styles.flagged_one(upright.astype(np.uint8), rng) is not None


def test_only_the_share_of_1s_asked_for_is_flagged_and_the_seed_decides_which(mnist):
    x, y = mnist.train_images[:6000], mnist.train_labels[:6000]
    out, n = styles.with_flagged_ones(x, y, 0.5, seed=3)
    changed = (out != x).any(axis=(1, 2))
    assert changed.sum() == n and set(y[changed]) == {1}
    ones = int((y == 1).sum())
    assert 0.25 * ones < n <= 0.5 * ones + 1  # half picked; the too slanted ones stay
    again, _ = styles.with_flagged_ones(x, y, 0.5, seed=3)
    other, _ = styles.with_flagged_ones(x, y, 0.5, seed=4)
    assert np.array_equal(out, again) and not np.array_equal(out, other)
    assert styles.with_flagged_ones(x, y, 0.0, seed=3) == (x, 0)
    assert not np.shares_memory(out, x)  # the dataset itself is left alone


def training_split(ds, recipe):
    """The images, labels and flagged count the run's training_split step fills in."""
    run = steps.Run(recipe, training.Options(), where=None, role=None, state=None, dataset=ds)
    steps.training_split(run)
    return run.images, run.labels, run.flagged


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_a_recipe_flags_1s_of_digits_only(dataset, mnist, fashion_mnist_dir):
    from cnnmnist import data

    ds = mnist if dataset == "mnist" else data.load(dataset, fashion_mnist_dir)
    recipe = presets.get("best").with_overrides(train_size=3000)
    x, y, flagged = training_split(ds, recipe)
    plain, _, none = training_split(ds, recipe.with_overrides(flagged_ones=0.0))
    assert none == 0 and len(x) == len(plain) == 3000
    if dataset == "mnist":
        assert flagged > 0 and (x != plain).any(axis=(1, 2)).sum() == flagged
    else:  # label 1 is a trouser there
        assert flagged == 0 and np.array_equal(x, plain)
