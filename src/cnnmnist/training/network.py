"""The recipe's network made ready for training (built, compiled with its optimizer and
learning-rate schedule) and, once trained, made ready for serving (float32, off any
distribution strategy, batch norm's statistics measured exactly)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cnnmnist import model
from cnnmnist.model import optimizers
from cnnmnist.presets import Preset
from cnnmnist.training import runtime

# Images whose activations give batch norm its population statistics at the end of training.
BATCH_NORM_IMAGES = 2_000


def learning_rate(peak: float, schedule: str, total_steps: int):
    """A constant rate, or one cycle: linear warm-up over 20% of the steps, then cosine to 0."""
    if schedule == "constant":
        return peak
    warmup = max(1, total_steps // 5)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / 25,
        decay_steps=max(1, total_steps - warmup),
        alpha=0.0,
        warmup_target=peak,
        warmup_steps=warmup,
    )


def compiled(recipe: Preset, steps_per_epoch: int = 1) -> keras.Model:
    """The recipe's network, compiled: the loop trains with its optimizer, and the compile
    settings travel in model.keras so that --resume restores the optimizer."""
    net = model.build(recipe.model)
    rate = learning_rate(recipe.learning_rate, recipe.schedule, steps_per_epoch * recipe.epochs)
    net.compile(
        optimizer=optimizers.build(recipe.optimizer, rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return net


def settle_batch_norm(net: keras.Model, images, batch_size: int = 500) -> int:
    """Replace every batch-norm layer's moving statistics by the exact mean and variance of
    its input over `images` (at most BATCH_NORM_IMAGES of them), in inference mode, layer by
    layer in order; returns how many layers were set.

    The moving averages lag the weights by about 1 / (1 - momentum) steps: after a short run
    they still sit near their initial 0 and 1 and the served model answers at chance while
    training looked fine. Measured in inference mode (no dropout, no augmentation), they are
    also what the served model actually sees.
    """
    layers = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    pixels = np.asarray(images[:BATCH_NORM_IMAGES], np.float32).reshape(-1, *model.INPUT_SHAPE)
    for layer in layers:
        probe = tf.function(keras.Model(net.inputs, layer.input))
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(pixels), batch_size):
            a = probe(pixels[start : start + batch_size], training=False).numpy()
            a = a.astype(np.float64).reshape(-1, a.shape[-1])  # channels last
            total, total_sq, count = total + a.sum(0), total_sq + (a * a).sum(0), count + len(a)
        mean = total / count
        variance = np.maximum(total_sq / count - mean * mean, 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
    return len(layers)


def served(net: keras.Model, recipe: Preset, strategy, images) -> keras.Model:
    """The trained network as the checkpoint serves it: float32, on no distribution
    strategy, with batch norm's statistics measured over training `images`.

    Mixed-precision training keeps float32 weights; serving them in float32 is portable
    (bfloat16 kernels exist only on some CPUs), at least as accurate, and convertible to
    TFLite. A network trained under a strategy is copied out of it, so the export is the
    same as a single-process run's. The training network gets the same statistics
    (model.keras).
    """
    out = net
    if net.dtype_policy.name != "float32" or strategy is not tf.distribute.get_strategy():
        with runtime.global_policy("float32"):
            out = model.build(recipe.model)
        out.set_weights(net.get_weights())
    if settle_batch_norm(out, images) and out is not net:
        for layer in out.layers:
            if hasattr(layer, "moving_mean"):
                twin = net.get_layer(layer.name)
                twin.moving_mean.assign(layer.moving_mean.numpy())
                twin.moving_variance.assign(layer.moving_variance.numpy())
    return out
