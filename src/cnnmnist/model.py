"""Architectures and optimizers, each a registered builder; a preset's model maps raw 0..255
pixels to logits. Keras is imported only inside the builders, so the registries are cheap."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

    from cnnmnist.presets import Preset

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


# Architectures by name: a name and its builder are one entry (x -> features before the
# logits). Presets name one; `Preset.validate` checks the name here.
ARCHITECTURES: dict[str, Callable] = {}


def architecture(name: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as the builder of architecture `name`."""

    def register(builder: Callable) -> Callable:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        return builder

    return register


def build(preset: Preset) -> keras.Model:
    """The preset's network: raw pixels in [0, 255] -> 10 logits (scaling is part of the model)."""
    import keras
    from keras import layers

    inputs = keras.Input(INPUT_SHAPE, dtype="float32", name="pixels")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    x = ARCHITECTURES[preset.model](x)
    # Logits stay float32 whatever the compute policy, so the softmax and loss are exact.
    logits = layers.Dense(NUM_CLASSES, name="logits", dtype="float32", **_init(preset))(x)
    return keras.Model(inputs, logits, name=preset.model)


def _init(preset: Preset) -> dict:
    """The chapter-7.2 model used N(0, 0.01) weights and no biases; the others Keras defaults."""
    return _NO_BIAS_NORMAL() if preset.model == "seed" else {}


def _NO_BIAS_NORMAL() -> dict:  # noqa: N802 - reads as the constant it stands for
    import keras

    return {"use_bias": False, "kernel_initializer": keras.initializers.RandomNormal(0.0, 0.01)}


@architecture("seed")
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


@architecture("seed-layers")
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


@architecture("mlp")
def _mlp(x):
    from keras import layers

    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="dense1")(x)
    return layers.Dense(256, activation="relu", name="dense2")(x)


@functools.cache
def tf1_rmsprop() -> type:
    """RMSProp as TF1's tf.train.RMSPropOptimizer had it: the mean square starts at ones
    (Keras: zeros) and epsilon is 1e-10 (Keras: 1e-7). Registered so model.keras reloads."""
    import keras

    @keras.saving.register_keras_serializable(package="cnnmnist")
    class TF1RMSprop(keras.optimizers.RMSprop):
        def __init__(self, learning_rate=0.001, rho=0.9, epsilon=1e-10, **kwargs):
            super().__init__(learning_rate=learning_rate, rho=rho, epsilon=epsilon, **kwargs)

        def build(self, var_list):
            if self.built:
                return
            super().build(var_list)
            for velocity in self._velocities:
                velocity.assign(keras.ops.ones_like(velocity))

    return TF1RMSprop


def _conv_bn(x, filters: int, name: str, strides: int = 1):
    """Conv 3x3 SAME without bias, batch norm, ReLU (the `best` building block)."""
    from keras import layers

    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _strided_stem(x, momentum: float = 0.99):
    """The first layer of `fast` and `best`: 5x5 patches two pixels apart, 32 filters, batch
    norm, ReLU. A single-channel convolution at full resolution and the pooling after it cost
    as much as the next layer (oneDNN works poorly on one input channel); the strided layer
    reads as well."""
    from keras import layers

    x = layers.Conv2D(32, 5, strides=2, padding="same", use_bias=False, name="conv1")(x)
    x = layers.BatchNormalization(momentum=momentum, name="conv1_bn")(x)
    return layers.Activation("relu", name="conv1_relu")(x)


def _dense_bn(x, units: int, momentum: float = 0.99):
    """Dense without bias, batch norm, ReLU. Batch norm statistics need a few times
    1 / (1 - momentum) steps to settle: a run of a few hundred steps needs 0.9."""
    from keras import layers

    x = layers.Dense(units, use_bias=False, name="dense")(x)
    x = layers.BatchNormalization(momentum=momentum, name="dense_bn")(x)
    return layers.Activation("relu", name="dense_relu")(x)


@architecture("best")
def _best(x):
    from keras import layers

    x = stretch()(dtype="float32", name="stretch")(x)
    # Augmentation is a training-time layer: inactive at inference, so the exported
    # signature sees the digit as given. float32: the image ops have no bfloat16 kernels.
    # First as users' images bring them (as `fast`), then turned, shifted and zoomed.
    x = user_like()(dtype="float32", name="user_like")(x)
    x = layers.RandomRotation(10 / 360, fill_mode="constant", dtype="float32", name="rotate")(x)
    x = layers.RandomTranslation(0.1, 0.1, fill_mode="constant", dtype="float32", name="shift")(x)
    x = layers.RandomZoom(0.1, fill_mode="constant", dtype="float32", name="zoom")(x)
    x = marks()(dtype="float32", name="marks")(x)  # last, so specks and lines stay sharp
    # Strides, not max pooling, halve the resolution, and the first layer is `fast`'s: a 3x3
    # convolution at 28x28 and the pooling after each pair made a step on a CPU without
    # native bfloat16 about twice as long, which kept a run over 20 minutes there. How the
    # two networks validate: benchmarks/results/choose_best.json.
    x = _strided_stem(x)
    x = _conv_bn(x, 32, "conv2")
    x = layers.Dropout(0.1, name="dropout1")(x)
    x = _conv_bn(x, 64, "conv3")
    x = _conv_bn(x, 64, "conv4", strides=2)
    x = layers.Dropout(0.2, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    return layers.Dropout(0.3, name="dropout3")(_dense_bn(x, 256))


def resampling(size_out: int, size_in: int):
    """The [size_out, size_in] matrix of a linear resize along one axis: a triangle filter,
    widened when shrinking so that every input pixel counts (antialiasing), rows summing
    to 1. An image resizes as R @ X @ R.T."""
    import numpy as np

    scale = size_out / size_in
    radius = max(1.0, 1.0 / scale)  # in input pixels
    centres = (np.arange(size_out) + 0.5) / scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(size_in) - centres[:, None]) / radius)
    return weights / weights.sum(axis=1, keepdims=True)


@functools.cache
def user_like() -> type:
    """A training-time layer that shows the network digits as users' images bring them: a
    share `rate` of each batch, split evenly, at a low resolution (9, 12 or 15 pixels high,
    back to 28), with strokes a pixel thicker, or thinner; the rest as it is. Inactive at
    inference, so the exported model is untouched. Registered so model.keras reloads."""
    import keras
    import numpy as np
    from keras import ops

    def low_resolution(side):
        # Down to side x side and back up, as one 28x28 matrix on each axis: a matrix product
        # compiles under XLA (the GPU path), where an antialiased image resize has no kernel.
        matrix = resampling(INPUT_SHAPE[0], side) @ resampling(side, INPUT_SHAPE[0])
        matrix = matrix.astype(np.float32)
        return lambda x: ops.einsum("ij,bjkc,lk->bilc", matrix, x, matrix)

    variants = [low_resolution(side) for side in (9, 12, 15)]
    variants.append(lambda x: ops.max_pool(x, 2, strides=1, padding="same"))  # thicker
    variants.append(lambda x: -ops.max_pool(-x, 2, strides=1, padding="same"))  # thinner

    @keras.saving.register_keras_serializable(package="cnnmnist")
    class UserLike(keras.layers.Layer):
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
            each = ops.cast(ops.cast(size, "float32") * (self.rate / len(variants)), "int32")
            parts = [variant(x[k * each : (k + 1) * each]) for k, variant in enumerate(variants)]
            return ops.concatenate([*parts, x[len(variants) * each :]], axis=0)

        def get_config(self):
            return super().get_config() | {"rate": self.rate, "seed": self.seed}

    return UserLike


@functools.cache
def marks() -> type:
    """A training-time layer that shows the network digits with marks that are not the
    digit: a share `rate` of each batch (its last images, so not those `user_like` changed),
    with specks of dust or sensor noise (2-15% of the pixels black or white), a pen stroke or
    a page's line across (straight at any angle, 1-2.5 px, solid or dashed), only the
    outlines of the strokes (a ring 1 or 2 px wide: an outline font, an edge detector), or a
    band 2-6 px wide along the rows or the columns that is erased, filled or inverted (a
    fold, a strip of tape, a shadow). Preprocessing takes a line or a band that crosses the
    digit for part of it; the network learns to read past them. Seeing marks anywhere and
    digits only near the middle, it learns to read a digit off the middle worse, so half a
    mark's share shows the digit moved 3-6 pixels each way (as a client that sends raw
    pixels may; an equal share cost MNIST accuracy). Inactive at inference. Registered so
    model.keras reloads."""
    import keras
    import numpy as np
    from keras import ops

    centred = np.arange(INPUT_SHAPE[0], dtype=np.float32) - (INPUT_SHAPE[0] - 1) / 2
    rows = centred.reshape(1, -1, 1, 1)
    cols = centred.reshape(1, 1, -1, 1)

    def per_image(x, low, high, seed):
        return keras.random.uniform((ops.shape(x)[0], 1, 1, 1), low, high, seed=seed)

    def specks(x, seed):
        share = per_image(x, 0.02, 0.15, seed)
        hit = keras.random.uniform(ops.shape(x), seed=seed) < share
        white = keras.random.uniform(ops.shape(x), seed=seed) < 0.5
        return ops.where(hit, ops.cast(white, x.dtype), x)

    def stroke(x, seed):
        angle = per_image(x, 0.0, np.pi, seed)
        across = cols * ops.cos(angle) + rows * ops.sin(angle) - per_image(x, -9, 9, seed)
        along = rows * ops.cos(angle) - cols * ops.sin(angle)
        line = ops.clip(per_image(x, 0.5, 1.25, seed) + 0.5 - ops.abs(across), 0.0, 1.0)
        period = per_image(x, 2.5, 4.0, seed)
        gap = ops.mod(along + 14.0, period) >= period / 2
        dashed = per_image(x, 0.0, 1.0, seed) < 0.5
        return ops.maximum(x, ops.where(dashed & gap, 0.0, line))

    def outline(x, seed):
        once = ops.max_pool(x, 3, strides=1, padding="same")  # strokes dilated
        twice = ops.max_pool(once, 3, strides=1, padding="same")
        wider = ops.where(per_image(x, 0.0, 1.0, seed) < 0.5, once, twice)
        return ops.cast(wider - x > 0.5, x.dtype)  # a ring 1 or 2 px wide around each stroke

    def band(x, seed):
        start = per_image(x, -8, 6, seed)
        width = ops.floor(per_image(x, 2, 7, seed))  # whole rows or columns
        position = ops.where(per_image(x, 0.0, 1.0, seed) < 0.5, rows, cols)
        inside = (position > start) & (position < start + width)
        kind = per_image(x, 0.0, 3.0, seed)
        covered = ops.where(kind < 1, 0.0, ops.where(kind < 2, 1.0, 1.0 - x))
        return ops.where(inside, covered, x)

    def moved(x, seed):
        # 3-6 pixels along each axis, either way: paper comes in at one side, what leaves at
        # the other is gone. One 0/1 matrix per image and axis (a product: XLA compiles it).
        def away(seed):
            size = ops.floor(per_image(x, 3, 7, seed))
            return ops.where(per_image(x, 0.0, 1.0, seed) < 0.5, -size, size)[:, :, :, 0]

        index = np.arange(INPUT_SHAPE[0], dtype=np.float32)
        down = ops.cast(index[:, None] - away(seed) == index[None, :], x.dtype)
        right = ops.cast(index[:, None] - away(seed) == index[None, :], x.dtype)
        return ops.einsum("bij,bjkc,blk->bilc", down, x, right)

    # Each variant and its weight in `rate`: a kind of mark 2, moved digits 1.
    variants = ((specks, 2), (stroke, 2), (outline, 2), (band, 2), (moved, 1))
    units = sum(weight for _, weight in variants)

    @keras.saving.register_keras_serializable(package="cnnmnist")
    class Marks(keras.layers.Layer):
        # Each kind of mark on 1 image in 32, moved digits on 1 in 64: 4 and 2 of a batch of
        # 128, and still 1 of each mark on a replica's 32.
        def __init__(self, rate: float = 9 / 64, seed: int | None = None, **kwargs):
            super().__init__(**kwargs)
            self.rate, self.seed = rate, seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, x, training=None):
            if not training:
                return x
            size = ops.shape(x)[0]
            counts = [
                ops.cast(ops.round(ops.cast(size, "float32") * self.rate * weight / units), "int32")
                for _, weight in variants
            ]
            start = size - sum(counts)
            parts = [x[:start]]
            for (variant, _), count in zip(variants, counts, strict=True):
                parts.append(variant(x[start : start + count], self.seed_generator))
                start = start + count
            return ops.concatenate(parts, axis=0)

        def get_config(self):
            return super().get_config() | {"rate": self.rate, "seed": self.seed}

    return Marks


@functools.cache
def stretch() -> type:
    """A layer that reads a grey or washed-out image as MNIST's white ink on black: the
    image's darkest pixel taken as its paper, its contrast stretched up to MNIST's when it has
    less (at most `MAX_GAIN` times, so a blank image is not stretched into noise). Every MNIST
    digit already spans 0 to 254 or 255 and passes through exactly (divided by 1, minus 0), so
    training is unchanged; what it buys is a model that a client feeding pixels straight to
    the SavedModel or TFLite file cannot break with grey paper. Registered so model.keras
    reloads."""
    import keras
    from keras import ops

    full = 254 / 255  # the faintest top ink level among MNIST's digits, in the scaled pixels

    @keras.saving.register_keras_serializable(package="cnnmnist")
    class Stretch(keras.layers.Layer):
        MAX_GAIN = 8.0

        def call(self, x):
            paper = ops.min(x, axis=(1, 2, 3), keepdims=True)
            span = ops.max(x, axis=(1, 2, 3), keepdims=True) - paper
            return (x - paper) / ops.clip(span / full, 1 / self.MAX_GAIN, 1.0)

    return Stretch


def load(path) -> keras.Model:
    """A checkpoint's model.keras as a Keras model, optimizer state included. Its layers and
    optimizer include cnnmnist's own classes, which Keras finds only once they are
    registered; this registers them first (plain `keras.saving.load_model` would fail with
    "Could not locate class 'Stretch'")."""
    import keras

    for register in (tf1_rmsprop, user_like, marks, stretch):
        register()
    return keras.saving.load_model(path)


@architecture("fast")
def _fast(x):
    from keras import layers

    x = stretch()(dtype="float32", name="stretch")(x)
    # Digits as users' images bring them (low resolution, other stroke widths): without them a
    # model trained two epochs on MNIST alone read other writers' 8x8 scans near chance.
    x = user_like()(dtype="float32", name="user_like")(x)

    # The second layer pools before batch norm, so the normalisation and ReLU run on a
    # quarter of the pixels. Momentum 0.9: the moving statistics follow the weights within a
    # short run (0.99 lags); settle_batch_norm then replaces them by exact ones at the end.
    x = _strided_stem(x, momentum=0.9)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)
    x = layers.MaxPooling2D(2, name="conv2_pool")(x)
    x = layers.BatchNormalization(momentum=0.9, name="conv2_bn")(x)
    x = layers.Activation("relu", name="conv2_relu")(x)
    x = layers.Flatten(name="flatten")(x)
    return _dense_bn(x, 128, momentum=0.9)


def augmentation() -> tuple[type, ...]:
    """The layer classes that change the digits in training only (identities at inference)."""
    from keras import layers

    random = (layers.RandomRotation, layers.RandomTranslation, layers.RandomZoom)
    return (user_like(), marks(), *random)


def without_augmentation(net: keras.Model) -> keras.Model:
    """The same network, sharing its layers and weights, with the augmentation layers left
    out: trained through it, the network sees the digits as given. Every architecture here
    is a chain of single-input layers; a network that branches is refused."""
    import keras

    pairs = zip(net.layers, net.layers[1:], strict=False)
    if any(layer.input is not before.output for before, layer in pairs):
        raise ValueError(f"{net.name} is not a chain of layers: its augmentation cannot be cut out")
    skipped = augmentation()
    inputs = keras.Input(INPUT_SHAPE, dtype="float32", name="pixels")
    x = inputs
    for layer in net.layers[1:]:
        if not isinstance(layer, skipped):
            x = layer(x)
    return keras.Model(inputs, x, name=f"{net.name}_clean")


def learning_rate(peak: float, schedule: str, total_steps: int):
    """A constant rate, or one cycle: linear warm-up over 20% of the steps, then cosine to 0."""
    import keras

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


def _keras_optimizer(class_name: str, **settings: Any) -> Callable:
    def make(learning_rate):
        import keras

        return getattr(keras.optimizers, class_name)(learning_rate=learning_rate, **settings)

    return make


# Optimizers by the names presets and --optimizer use -> a function of the learning rate.
OPTIMIZERS: dict[str, Callable] = {
    "adam": _keras_optimizer("Adam"),
    "adamw": _keras_optimizer("AdamW"),
    "nadam": _keras_optimizer("Nadam"),
    "adamax": _keras_optimizer("Adamax"),
    "rmsprop": _keras_optimizer("RMSprop", rho=0.9),  # the chapter's decay 0.9
    "rmsprop-tf1": lambda learning_rate: tf1_rmsprop()(learning_rate=learning_rate),
    "sgd": _keras_optimizer("SGD"),
    "adagrad": _keras_optimizer("Adagrad"),
    "adadelta": _keras_optimizer("Adadelta"),
    "lion": _keras_optimizer("Lion"),
}


def optimizer(name: str, learning_rate) -> keras.optimizers.Optimizer:
    """A Keras optimizer by its registered name."""
    return OPTIMIZERS[name](learning_rate)


def compile_model(recipe: Preset, steps_per_epoch: int = 1):
    """Build and compile the preset's model: the loop trains with its optimizer, and the
    compile settings travel in model.keras so that --resume restores the optimizer."""
    import keras

    net = build(recipe)
    rate = learning_rate(recipe.learning_rate, recipe.schedule, steps_per_epoch * recipe.epochs)
    net.compile(
        optimizer=optimizer(recipe.optimizer, rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return net


# Images whose activations give batch norm its population statistics at the end of training.
BATCH_NORM_IMAGES = 2_000


def settle_batch_norm(net, images, batch_size: int = 500) -> int:
    """Replace every batch-norm layer's moving statistics by the exact mean and variance of
    its input over `images` (at most BATCH_NORM_IMAGES of them), in inference mode, layer by
    layer in order; returns how many layers were set.

    The moving averages lag the weights by about 1 / (1 - momentum) steps: after a short run
    they still sit near their initial 0 and 1 and the served model answers at chance while
    training looked fine. Measured in inference mode (no dropout, no augmentation), they are
    also what the served model actually sees.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    layers = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    pixels = np.asarray(images[:BATCH_NORM_IMAGES], np.float32).reshape(-1, *INPUT_SHAPE)
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
