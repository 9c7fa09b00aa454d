"""cnnmnist's own Keras layers, registered with Keras: importing this module is all that
`keras.saving.load_model` needs to read a checkpoint's model.keras.

Stretch reads any grey image as MNIST's white ink on black; UserLike and Marks change the
training digits (inactive at inference, so the exported model is untouched).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

INPUT_SHAPE = (28, 28, 1)
PACKAGE = "cnnmnist"  # the name Keras files these classes under ("cnnmnist>Stretch")


@keras.saving.register_keras_serializable(package=PACKAGE)
class Stretch(layers.Layer):
    """Reads a grey or washed-out image as MNIST's white ink on black: the image's darkest
    pixel taken as its paper, its contrast stretched up to MNIST's when it has less (at most
    MAX_GAIN times, so a blank image is not stretched into noise). Every MNIST digit already
    spans 0 to 254 or 255 and passes through exactly (divided by 1, minus 0), so training is
    unchanged; what it buys is a model that a client feeding pixels straight to the
    SavedModel or TFLite file cannot break with grey paper."""

    MAX_GAIN = 8.0
    FULL = 254 / 255  # the faintest top ink level among MNIST's digits, in the scaled pixels

    def call(self, x):
        paper = ops.min(x, axis=(1, 2, 3), keepdims=True)
        span = ops.max(x, axis=(1, 2, 3), keepdims=True) - paper
        return (x - paper) / ops.clip(span / self.FULL, 1 / self.MAX_GAIN, 1.0)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FusedBatchNorm(layers.BatchNormalization):
    """Batch normalisation whose training step is TensorFlow's fused kernel: the batch's
    statistics, the normalisation and its gradient as one op (oneDNN's on a CPU, about twice
    as fast as Keras's separate ones: benchmarks/results/step_profile.json). Inference, the
    weights and the moving statistics' update are Keras's. Channels last, no mask."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        shape = ops.shape(inputs)
        x = ops.cast(inputs, "float32")  # as Keras's: statistics in float32 whatever the policy
        if len(inputs.shape) != 4:
            x = ops.reshape(x, (-1, 1, 1, inputs.shape[-1]))
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x,
            ops.cast(self.gamma, "float32"),
            ops.cast(self.beta, "float32"),
            epsilon=self.epsilon,
            is_training=True,
        )
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return ops.cast(ops.reshape(y, shape), self.compute_dtype)


def resampling(size_out: int, size_in: int) -> np.ndarray:
    """The [size_out, size_in] matrix of a linear resize along one axis: a triangle filter,
    widened when shrinking so that every input pixel counts (antialiasing), rows summing
    to 1. An image resizes as R @ X @ R.T."""
    scale = size_out / size_in
    radius = max(1.0, 1.0 / scale)  # in input pixels
    centres = (np.arange(size_out) + 0.5) / scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(size_in) - centres[:, None]) / radius)
    return weights / weights.sum(axis=1, keepdims=True)


def _low_resolution(side: int):
    """Down to side x side and back up, as one 28x28 matrix on each axis: a matrix product
    compiles under XLA (the GPU path), where an antialiased image resize has no kernel."""
    matrix = resampling(INPUT_SHAPE[0], side) @ resampling(side, INPUT_SHAPE[0])
    matrix = matrix.astype(np.float32)
    return lambda x: ops.einsum("ij,bjkc,lk->bilc", matrix, x, matrix)


def _thicker(x):
    return ops.max_pool(x, 2, strides=1, padding="same")


def _thinner(x):
    return -ops.max_pool(-x, 2, strides=1, padding="same")


USER_LIKE = (*(_low_resolution(side) for side in (9, 12, 15)), _thicker, _thinner)


@keras.saving.register_keras_serializable(package=PACKAGE)
class UserLike(layers.Layer):
    """Shows the network digits as users' images bring them: a share `rate` of each batch,
    split evenly, at a low resolution (9, 12 or 15 pixels high, back to 28), with strokes a
    pixel thicker, or thinner; the rest as it is. Inactive at inference."""

    # `seed` is kept for the configs of saved models; the choice needs no random draw.
    def __init__(self, rate: float = 0.5, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed

    def call(self, x, training=None):
        if not training:
            return x
        # Batches come shuffled, so consecutive slices of one are random images: each
        # variant transforms only its own slice, where drawing a variant per image meant
        # computing all five for every image, most of what the layer cost.
        size = ops.shape(x)[0]
        each = ops.cast(ops.cast(size, "float32") * (self.rate / len(USER_LIKE)), "int32")
        parts = [variant(x[k * each : (k + 1) * each]) for k, variant in enumerate(USER_LIKE)]
        return ops.concatenate([*parts, x[len(USER_LIKE) * each :]], axis=0)

    def get_config(self):
        return super().get_config() | {"rate": self.rate, "seed": self.seed}


# Pixel coordinates from the centre, for the marks drawn across a digit.
_CENTRED = np.arange(INPUT_SHAPE[0], dtype=np.float32) - (INPUT_SHAPE[0] - 1) / 2
_ROWS = _CENTRED.reshape(1, -1, 1, 1)
_COLS = _CENTRED.reshape(1, 1, -1, 1)


def _per_image(x, low, high, seed):
    return keras.random.uniform((ops.shape(x)[0], 1, 1, 1), low, high, seed=seed)


def _specks(x, seed):
    """Dust or sensor noise: 2-15% of the pixels black or white."""
    share = _per_image(x, 0.02, 0.15, seed)
    hit = keras.random.uniform(ops.shape(x), seed=seed) < share
    white = keras.random.uniform(ops.shape(x), seed=seed) < 0.5
    return ops.where(hit, ops.cast(white, x.dtype), x)


def _stroke(x, seed):
    """A pen stroke or a page's line across: straight at any angle, 1-2.5 px, solid or
    dashed."""
    angle = _per_image(x, 0.0, np.pi, seed)
    across = _COLS * ops.cos(angle) + _ROWS * ops.sin(angle) - _per_image(x, -9, 9, seed)
    along = _ROWS * ops.cos(angle) - _COLS * ops.sin(angle)
    line = ops.clip(_per_image(x, 0.5, 1.25, seed) + 0.5 - ops.abs(across), 0.0, 1.0)
    period = _per_image(x, 2.5, 4.0, seed)
    gap = ops.mod(along + 14.0, period) >= period / 2
    dashed = _per_image(x, 0.0, 1.0, seed) < 0.5
    return ops.maximum(x, ops.where(dashed & gap, 0.0, line))


def _outline(x, seed):
    """Only the outlines of the strokes: a ring 1 or 2 px wide (an outline font, an edge
    detector)."""
    once = ops.max_pool(x, 3, strides=1, padding="same")  # strokes dilated
    twice = ops.max_pool(once, 3, strides=1, padding="same")
    wider = ops.where(_per_image(x, 0.0, 1.0, seed) < 0.5, once, twice)
    return ops.cast(wider - x > 0.5, x.dtype)


def _band(x, seed):
    """A band 2-6 px wide along the rows or the columns, erased, filled or inverted (a fold,
    a strip of tape, a shadow)."""
    start = _per_image(x, -8, 6, seed)
    width = ops.floor(_per_image(x, 2, 7, seed))  # whole rows or columns
    position = ops.where(_per_image(x, 0.0, 1.0, seed) < 0.5, _ROWS, _COLS)
    inside = (position > start) & (position < start + width)
    kind = _per_image(x, 0.0, 3.0, seed)
    covered = ops.where(kind < 1, 0.0, ops.where(kind < 2, 1.0, 1.0 - x))
    return ops.where(inside, covered, x)


def _moved(x, seed):
    """The digit moved 3-6 pixels along each axis, either way: paper comes in at one side,
    what leaves at the other is gone. One 0/1 matrix per image and axis (a product: XLA
    compiles it)."""

    def away(seed):
        size = ops.floor(_per_image(x, 3, 7, seed))
        return ops.where(_per_image(x, 0.0, 1.0, seed) < 0.5, -size, size)[:, :, :, 0]

    index = np.arange(INPUT_SHAPE[0], dtype=np.float32)
    down = ops.cast(index[:, None] - away(seed) == index[None, :], x.dtype)
    right = ops.cast(index[:, None] - away(seed) == index[None, :], x.dtype)
    return ops.einsum("bij,bjkc,blk->bilc", down, x, right)


# Each kind of mark and its weight in Marks' `rate`: a kind of mark 2, moved digits 1.
MARKS = ((_specks, 2), (_stroke, 2), (_outline, 2), (_band, 2), (_moved, 1))


@keras.saving.register_keras_serializable(package=PACKAGE)
class Marks(layers.Layer):
    """Shows the network digits with marks that are not the digit (MARKS): a share `rate`
    of each batch, its last images, so not those UserLike changed. Preprocessing takes a
    line or a band that crosses the digit for part of it; the network learns to read past
    them. Seeing marks anywhere and digits only near the middle, it learns to read a digit
    off the middle worse, so half a mark's share shows the digit moved (as a client that
    sends raw pixels may; an equal share cost MNIST accuracy). Inactive at inference."""

    # Each kind of mark on 1 image in 32, moved digits on 1 in 64: 4 and 2 of a batch of
    # 128, and still 1 of each mark on a replica's 32.
    def __init__(self, rate: float = 9 / 64, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training:
            return x
        size = ops.cast(ops.shape(x)[0], "float32")
        units = sum(weight for _, weight in MARKS)
        counts = [
            ops.cast(ops.round(size * self.rate * weight / units), "int32") for _, weight in MARKS
        ]
        start = ops.shape(x)[0] - sum(counts)
        parts = [x[:start]]
        for (variant, _), count in zip(MARKS, counts, strict=True):
            parts.append(variant(x[start : start + count], self.seed_generator))
            start = start + count
        return ops.concatenate(parts, axis=0)

    def get_config(self):
        return super().get_config() | {"rate": self.rate, "seed": self.seed}


# The layers that change the digits in training only (identities at inference).
AUGMENTATION = (UserLike, Marks, layers.RandomRotation, layers.RandomTranslation, layers.RandomZoom)
