"""Where a training step's time goes, float32, on this CPU: the pieces of `fast`'s layers
one by one, `best`'s step with and without its augmentation, and the ceiling of any
training loop on the book's recipe (a compiled step on a batch already in memory, beside
plain `model.fit`, alternately).

    python benchmarks/step_profile.py               # writes benchmarks/results/step_profile.json
    python benchmarks/step_profile.py --tiny --out /tmp/p.json   # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from cnnmnist.hardware import NATIVE_BF16, cpu_flags

RESULTS = Path(__file__).parent / "results" / "step_profile.json"


def fastest_ms(call, repeats: int, calls: int) -> float:
    """The fastest of `repeats` timings of `calls` calls, in ms per call (after a warm-up)."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return round(best * 1000, 2)


def pieces(batch: int, repeats: int, calls: int) -> dict[str, float]:
    """Forward and backward of each piece alone (gradient for its input included), ms."""
    import keras
    import numpy as np
    import tensorflow as tf
    from keras import layers

    from cnnmnist.model.layers import UserLike

    def bn_relu(x):
        return layers.Activation("relu")(layers.BatchNormalization()(x))

    def dense_bn(x):
        return bn_relu(layers.Dense(128, use_bias=False)(layers.Flatten()(x)))

    table = {
        "user_like augmentation": (lambda x: UserLike()(x, training=True), (28, 28, 1)),
        "conv 3x3 1->32 at 28x28": (lambda x: layers.Conv2D(32, 3, padding="same")(x), (28, 28, 1)),
        "max pool at 28x28x32": (lambda x: layers.MaxPooling2D(2)(x), (28, 28, 32)),
        "conv 5x5 stride 2, 1->32 at 28x28": (
            lambda x: layers.Conv2D(32, 5, strides=2, padding="same")(x),
            (28, 28, 1),
        ),
        "batch norm + relu at 14x14x32": (bn_relu, (14, 14, 32)),
        "conv 3x3 32->32 at 14x14": (
            lambda x: layers.Conv2D(32, 3, padding="same")(x),
            (14, 14, 32),
        ),
        "max pool at 14x14x32": (lambda x: layers.MaxPooling2D(2)(x), (14, 14, 32)),
        "batch norm + relu at 7x7x32": (bn_relu, (7, 7, 32)),
        "dense 1568->128 + batch norm + relu": (dense_bn, (7, 7, 32)),
    }
    out = {}
    for name, (build, shape) in table.items():
        inputs = keras.Input(shape)
        net = keras.Model(inputs, build(inputs))
        x = tf.constant(np.random.default_rng(0).random((batch, *shape), np.float32))

        @tf.function
        def step(x, net=net):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = net(x, training=True)
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x, *net.trainable_variables])

        out[name] = fastest_ms(lambda step=step, x=x: step(x), repeats, calls)
        print(f"{name:40s} {out[name]:8.2f} ms", flush=True)
    return out


def best_step(batch: int, steps: int, repeats: int) -> dict[str, float]:
    """`best`'s training step, ms, with and without its augmentation layers, and the
    augmentation alone (forward: it holds no weights)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cnnmnist import model, presets

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, batch * steps)

    def step_ms(net) -> float:
        net.compile(
            "adam",
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=steps,
        )
        fit = lambda: net.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # noqa: E731
        return round(fastest_ms(fit, repeats, 1) / steps, 1)

    augmentation = ("rotate", "shift", "zoom")
    net = model.build(presets.get("best").model)
    without = keras.models.clone_model(
        net,
        clone_function=lambda layer: (
            keras.layers.Identity(name=layer.name)
            if layer.name in augmentation
            else layer.__class__.from_config(layer.get_config())
        ),
    )
    whole, bare = step_ms(net), step_ms(without)
    images = tf.constant(x[:batch] / 255)
    layers = keras.Sequential([net.get_layer(name) for name in augmentation])
    augment = tf.function(lambda images: layers(images, training=True))
    alone = fastest_ms(lambda: augment(images), repeats, steps)
    return {"whole_ms": whole, "without_augmentation_ms": bare, "augmentation_alone_ms": alone}


def loop_ceiling(images: int, rounds: int) -> dict:
    """Images/s of plain `model.fit` on the book's recipe beside a compiled step run 50
    times per call on one batch in memory (no input pipeline, no Python per step)."""
    import numpy as np
    import tensorflow as tf

    from cnnmnist import presets
    from cnnmnist.training import network

    recipe = presets.get("seed")
    batch = recipe.batch_size
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, images)
    fitted = network.compiled(recipe)
    fitted.fit(x[: batch * 2], y[: batch * 2], batch_size=batch, verbose=0)
    bare = network.compiled(recipe)
    xb, yb = tf.constant(x[:batch]), tf.constant(y[:batch])

    @tf.function
    def fifty():
        for _ in tf.range(50):
            with tf.GradientTape() as tape:
                loss = bare.loss(yb, bare(xb, training=True))
            grads = tape.gradient(loss, bare.trainable_variables)
            bare.optimizer.apply_gradients(zip(grads, bare.trainable_variables, strict=True))

    fifty()
    fit_rates, bare_rates = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        fitted.fit(x, y, batch_size=batch, verbose=0)
        fit_rates.append(round(images / (time.perf_counter() - start), 1))
        start = time.perf_counter()
        for _ in range(max(1, images // (batch * 50))):
            fifty()
        bare_rates.append(
            round(max(1, images // (batch * 50)) * batch * 50 / (time.perf_counter() - start), 1)
        )
        print(
            f"model.fit {fit_rates[-1]} images/s, bare step {bare_rates[-1]} images/s", flush=True
        )
    ratios = [b / f for b, f in zip(bare_rates, fit_rates, strict=True)]
    return {
        "model_fit_images_per_second": fit_rates,
        "bare_step_images_per_second": bare_rates,
        "ratio_per_round": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="few repeats, for a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import keras

    keras.mixed_precision.set_global_policy("float32")
    tiny = args.tiny
    result = {
        "command": " ".join(["python", "benchmarks/step_profile.py", *sys.argv[1:]]),
        "tiny": tiny,
        "cpu_flags": sorted(cpu_flags() & (NATIVE_BF16 | {"avx2", "avx512f"})),
        "fast_pieces_ms_batch_96": pieces(96, 1 if tiny else 5, 2 if tiny else 20),
        "best_step_batch_128": best_step(128, 2 if tiny else 20, 1 if tiny else 3),
        "book_recipe_loop_ceiling": loop_ceiling(5000 if tiny else 10000, 1 if tiny else 5),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
