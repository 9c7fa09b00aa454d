"""Build a keras.Model from a preset's model spec; the model maps raw 0..255 pixels to logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from cnnmnist.presets import Preset

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def build(preset: Preset) -> keras.Model:
    """The preset's network: raw pixels in [0, 255] -> 10 logits (scaling is part of the model)."""
    import keras
    from keras import layers

    builders = {"seed": _seed, "seed-layers": _seed_layers, "mlp": _mlp}
    if preset.model not in builders:
        raise ValueError(f"unknown model {preset.model!r}")
    inputs = keras.Input(INPUT_SHAPE, dtype="float32", name="pixels")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    x = builders[preset.model](x)
    # Logits stay float32 whatever the compute policy, so the softmax and loss are exact.
    logits = layers.Dense(NUM_CLASSES, name="logits", dtype="float32", **_init(preset))(x)
    return keras.Model(inputs, logits, name=preset.model)


def _init(preset: Preset) -> dict:
    """The chapter-7.2 model used N(0, 0.01) weights and no biases; the others Keras defaults."""
    return _NO_BIAS_NORMAL() if preset.model == "seed" else {}


def _NO_BIAS_NORMAL() -> dict:  # noqa: N802 - reads as the constant it stands for
    import keras

    return {"use_bias": False, "kernel_initializer": keras.initializers.RandomNormal(0.0, 0.01)}


def _seed(x):
    from keras import layers

    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1", **_NO_BIAS_NORMAL())(
        x
    )
    x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2", **_NO_BIAS_NORMAL())(
        x
    )
    x = layers.MaxPooling2D(2, padding="same", name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense", **_NO_BIAS_NORMAL())(x)
    return layers.Dropout(0.3, name="dropout")(x)  # the chapter's keep_prob 0.7


def _seed_layers(x):
    from keras import layers

    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = layers.Dropout(0.7, name="dropout1")(x)  # the chapter's rate 0.7, kept on purpose
    x = layers.Conv2D(64, 3, padding="valid", name="conv2")(x)  # no activation, as printed
    x = layers.MaxPooling2D(2, padding="valid", name="pool2")(x)
    x = layers.Dropout(0.7, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense")(x)
    return layers.Dropout(0.5, name="dropout3")(x)


def _mlp(x):
    from keras import layers

    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense1")(x)
    return layers.Dense(256, activation="relu", name="dense2")(x)


def optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """A Keras optimizer by the names presets use (rmsprop keeps the chapter's decay 0.9)."""
    import keras

    classes = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "nadam": keras.optimizers.Nadam,
        "adamax": keras.optimizers.Adamax,
        "rmsprop": lambda learning_rate: keras.optimizers.RMSprop(learning_rate, rho=0.9),
        "sgd": keras.optimizers.SGD,
        "adagrad": keras.optimizers.Adagrad,
        "adadelta": keras.optimizers.Adadelta,
        "lion": keras.optimizers.Lion,
    }
    return classes[name](learning_rate=learning_rate)
