"""The architectures, by name: raw 0..255 pixels [N, 28, 28, 1] -> 10 logits, scaling inside
the model. `build(name)` is the only way in; a name and its builder are one registry entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers

from cnnmnist.errors import UsageError
from cnnmnist.model.layers import (
    AUGMENTATION,
    INPUT_SHAPE,
    FusedBatchNorm,
    Marks,
    Stretch,
    UserLike,
)

NUM_CLASSES = 10


@dataclass(frozen=True)
class Architecture:
    """A network body (scaled pixels -> features) and how its logits layer is initialised."""

    body: Callable
    logits: Callable[[], dict]


ARCHITECTURES: dict[str, Architecture] = {}


def _keras_defaults() -> dict:
    return {}


def architecture(name: str, logits: Callable[[], dict] = _keras_defaults) -> Callable:
    """Register the decorated body as architecture `name`, its logits layer made with the
    keyword arguments `logits()` returns."""

    def register(body: Callable) -> Callable:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = Architecture(body, logits)
        return body

    return register


def build(name: str, **options) -> keras.Model:
    """The network registered as `name`: raw pixels in [0, 255] -> 10 logits. `options` go to
    its body (none of today's bodies takes any)."""
    try:
        chosen = ARCHITECTURES[name]
    except KeyError:
        raise UsageError(
            f"unknown model {name!r} (choose from: {', '.join(ARCHITECTURES)})"
        ) from None
    inputs = keras.Input(INPUT_SHAPE, dtype="float32", name="pixels")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    x = chosen.body(x, **options)
    # Logits stay float32 whatever the compute policy, so the softmax and loss are exact.
    logits = layers.Dense(NUM_CLASSES, name="logits", dtype="float32", **chosen.logits())(x)
    return keras.Model(inputs, logits, name=name)


def _no_bias_normal() -> dict:
    """The chapter-7.2 model's weights: N(0, 0.01), and no biases (a new initializer each)."""
    return {"use_bias": False, "kernel_initializer": keras.initializers.RandomNormal(0.0, 0.01)}


@architecture("seed", logits=_no_bias_normal)
def _seed(x):
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1", **_no_bias_normal())(
        x
    )
    x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2", **_no_bias_normal())(
        x
    )
    x = layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense", **_no_bias_normal())(x)
    return layers.Dropout(0.3, name="dropout")(x)  # the chapter's keep_prob 0.7


@architecture("seed-layers")
def _seed_layers(x):
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = layers.Dropout(0.7, name="dropout1")(x)  # the chapter's rate 0.7, kept on purpose
    x = layers.Conv2D(64, 3, padding="valid", name="conv2")(x)  # no activation, as printed
    x = layers.MaxPooling2D(2, padding="valid", name="pool2")(x)
    x = layers.Dropout(0.7, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense")(x)
    return layers.Dropout(0.5, name="dropout3")(x)


@architecture("mlp")
def _mlp(x):
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense1")(x)
    return layers.Dense(256, activation="relu", name="dense2")(x)


def _conv_bn(x, filters: int, name: str, strides: int = 1):
    """Conv 3x3 SAME without bias, batch norm, ReLU (the `best` building block)."""
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = FusedBatchNorm(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _strided_stem(x, momentum: float = 0.99):
    """The first layer of `fast` and `best`: 5x5 patches two pixels apart, 32 filters, batch
    norm, ReLU. A single-channel convolution at full resolution and the pooling after it cost
    as much as the next layer (oneDNN works poorly on one input channel); the strided layer
    reads as well."""
    x = layers.Conv2D(32, 5, strides=2, padding="same", use_bias=False, name="conv1")(x)
    x = FusedBatchNorm(momentum=momentum, name="conv1_bn")(x)
    return layers.Activation("relu", name="conv1_relu")(x)


def _dense_bn(x, units: int, momentum: float = 0.99):
    """Dense without bias, batch norm, ReLU. Batch norm statistics need a few times
    1 / (1 - momentum) steps to settle: a run of a few hundred steps needs 0.9."""
    x = layers.Dense(units, use_bias=False, name="dense")(x)
    x = FusedBatchNorm(momentum=momentum, name="dense_bn")(x)
    return layers.Activation("relu", name="dense_relu")(x)


@architecture("best")
def _best(x):
    x = Stretch(dtype="float32", name="stretch")(x)
    # Augmentation is a training-time layer: inactive at inference, so the exported
    # signature sees the digit as given. float32: the image ops have no bfloat16 kernels.
    # First as users' images bring them (as `fast`), then turned, shifted and zoomed.
    x = UserLike(dtype="float32", name="user_like")(x)
    x = layers.RandomRotation(10 / 360, fill_mode="constant", dtype="float32", name="rotate")(x)
    x = layers.RandomTranslation(0.1, 0.1, fill_mode="constant", dtype="float32", name="shift")(x)
    x = layers.RandomZoom(0.1, fill_mode="constant", dtype="float32", name="zoom")(x)
    x = Marks(dtype="float32", name="marks")(x)  # last, so specks and lines stay sharp
    # Strides, not max pooling, halve the resolution, and the first layer is `fast`'s: a 3x3
    # convolution at 28x28 and the pooling after each pair made a step on a CPU without
    # native bfloat16 about twice as long. How the two networks validate:
    # benchmarks/results/choose_best.json.
    x = _strided_stem(x)
    x = _conv_bn(x, 32, "conv2")
    x = layers.Dropout(0.1, name="dropout1")(x)
    x = _conv_bn(x, 64, "conv3")
    x = _conv_bn(x, 64, "conv4", strides=2)
    x = layers.Dropout(0.2, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    return layers.Dropout(0.3, name="dropout3")(_dense_bn(x, 256))


@architecture("fast")
def _fast(x):
    x = Stretch(dtype="float32", name="stretch")(x)
    # Digits as users' images bring them (low resolution, other stroke widths): without them a
    # model trained two epochs on MNIST alone read other writers' 8x8 scans near chance.
    x = UserLike(dtype="float32", name="user_like")(x)
    # The second layer pools before batch norm, so the normalisation and ReLU run on a
    # quarter of the pixels. Momentum 0.9: the moving statistics follow the weights within a
    # short run (0.99 lags); the training side replaces them by exact ones at the end.
    x = _strided_stem(x, momentum=0.9)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)
    x = layers.MaxPooling2D(2, name="conv2_pool")(x)
    x = FusedBatchNorm(momentum=0.9, name="conv2_bn")(x)
    x = layers.Activation("relu", name="conv2_relu")(x)
    x = layers.Flatten(name="flatten")(x)
    return _dense_bn(x, 128, momentum=0.9)


def without_augmentation(net: keras.Model) -> keras.Model:
    """The same network, sharing its layers and weights, with the augmentation layers left
    out: trained through it, the network sees the digits as given. Every architecture here
    is a chain of single-input layers; a network that branches is refused."""
    pairs = zip(net.layers, net.layers[1:], strict=False)
    if any(layer.input is not before.output for before, layer in pairs):
        raise ValueError(f"{net.name} is not a chain of layers: its augmentation cannot be cut out")
    inputs = keras.Input(INPUT_SHAPE, dtype="float32", name="pixels")
    x = inputs
    for layer in net.layers[1:]:
        if not isinstance(layer, AUGMENTATION):
            x = layer(x)
    return keras.Model(inputs, x, name=f"{net.name}_clean")
