"""The training run: data -> model -> fit -> test evaluation -> checkpoint."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import __version__, checkpoint, data
from cnnmnist.errors import CheckpointError, CnnmnistError
from cnnmnist.presets import Preset

DEVICES = ("auto", "cpu", "gpu")


class TrainingDiverged(CnnmnistError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What a finished run produced (the in-memory model is kept for callers and tests)."""

    checkpoint: Path
    preset: str
    epochs: int
    test_accuracy: float
    test_loss: float
    history: list[dict[str, Any]]
    seconds: float
    model: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The --json report."""
        return {
            "checkpoint": str(self.checkpoint),
            "preset": self.preset,
            "epochs": self.epochs,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "history": self.history,
            "seconds": round(self.seconds, 3),
        }


def configure_device(device: str) -> None:
    """Choose CPU or GPU before TensorFlow touches a device; GPUs grow their memory as needed."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        raise CnnmnistError(
            "--device gpu: TensorFlow sees no GPU on this machine (use --device cpu)"
        )
    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
        return
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)


def pipeline(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, epochs: range):
    """tf.data batches of (float32 pixels, int32 labels), reshuffled per epoch from (seed, epoch).

    The order of epoch e depends only on (seed, e), so a run resumed at epoch e sees exactly
    the batches an uninterrupted run would. Images stay uint8 in memory; batches are cast.
    """
    import tensorflow as tf

    x = tf.constant(images.reshape(-1, 28, 28, 1))
    y = tf.constant(labels.astype(np.int32))
    n = len(images)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    ds = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches)
    return ds.map(
        lambda idx: (tf.cast(tf.gather(x, idx), tf.float32), tf.gather(y, idx)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    ).prefetch(tf.data.AUTOTUNE)


def fixed_batches(images: np.ndarray, labels: np.ndarray, batch_size: int = 1000):
    """Unshuffled tf.data batches for evaluation."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(
        (images.reshape(-1, 28, 28, 1), labels.astype(np.int32))
    )
    return ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2)


def divergence_guard():
    """A callback that stops training at the first non-finite loss and remembers where."""
    import keras

    class Guard(keras.callbacks.Callback):
        where: tuple[int, int, float] | None = None

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", 0.0))
            if not math.isfinite(loss):
                self.where = (self._epoch + 1, batch + 1, loss)
                self.model.stop_training = True

    return Guard()


def compile_model(recipe: Preset):
    """Build and compile the preset's model (loss on logits, accuracy metric)."""
    import keras

    from cnnmnist import model as models

    net = models.build(recipe)
    net.compile(
        optimizer=models.optimizer(recipe.optimizer, recipe.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return net


def run(
    recipe: Preset,
    *,
    dataset: str = "mnist",
    data_dir: Path | None = None,
    out: Path = Path("ckpt"),
    force: bool = False,
    device: str = "auto",
    tensorboard: Path | None = None,
    live_progress: bool | None = None,
) -> TrainResult:
    """Train a preset's recipe and write its checkpoint to `out`; return the result."""
    started = time.perf_counter()
    out = Path(out)
    checkpoint.recover(out)
    if out.exists() and not force:  # fail before minutes of training, not after
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    ds = data.load(dataset, data_dir)

    import keras
    import tensorflow as tf

    from cnnmnist.console import progress_callback

    configure_device(device)
    keras.utils.set_random_seed(recipe.seed)
    x_train, y_train = ds.split("train", recipe.validation_size)
    if recipe.train_size:
        x_train, y_train = x_train[: recipe.train_size], y_train[: recipe.train_size]
    if len(x_train) == 0:
        raise CnnmnistError(f"validation_size {recipe.validation_size} leaves no training images")
    steps = math.ceil(len(x_train) / recipe.batch_size)
    train_ds = pipeline(x_train, y_train, recipe.batch_size, recipe.seed, range(recipe.epochs))
    val_ds = (
        fixed_batches(*ds.split("validation", recipe.validation_size))
        if recipe.validation_size
        else None
    )

    net = compile_model(recipe)
    progress = progress_callback(recipe.epochs, steps, live=live_progress)
    guard = divergence_guard()
    callbacks = [guard, progress]
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard)))
    net.fit(
        train_ds,
        epochs=recipe.epochs,
        steps_per_epoch=steps,
        validation_data=val_ds,
        callbacks=callbacks,
        shuffle=False,  # the pipeline already shuffles, reproducibly
        verbose=0,
    )
    if guard.where:
        epoch, step, loss = guard.where
        raise TrainingDiverged(
            f"training diverged: the loss became {loss} at epoch {epoch}, step {step}; "
            f"try a lower --learning-rate than {recipe.learning_rate:g}. "
            f"Nothing was written to {out}."
        )

    test_loss, test_accuracy = net.evaluate(
        fixed_batches(ds.test_images, ds.test_labels), verbose=0
    )
    seconds = time.perf_counter() - started
    metadata = {
        "preset": recipe.name,
        "hyperparameters": recipe.hyperparameters(),
        "seed": recipe.seed,
        "dataset": {
            "name": ds.name,
            "source": str(ds.source),
            "checksums": ds.checksums,
            "train_size": len(x_train),
            "validation_size": recipe.validation_size,
            "test_size": len(ds.test_images),
        },
        "history": progress.history,
        "test": {
            "accuracy": float(test_accuracy),
            "loss": float(test_loss),
            "n": len(ds.test_images),
        },
        "reference_accuracy": recipe.reference_accuracy,
        "versions": {
            "cnnmnist": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "training_seconds": round(seconds, 3),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "signature": {
            "name": checkpoint.SIGNATURE,
            "input": "pixels: float32 [N, 28, 28, 1], raw values 0..255, white digit on black",
            "output": "probabilities: float32 [N, 10]",
        },
    }
    checkpoint.write(net, out, metadata, overwrite=force, check_images=ds.test_images)
    return TrainResult(
        checkpoint=out,
        preset=recipe.name,
        epochs=recipe.epochs,
        test_accuracy=float(test_accuracy),
        test_loss=float(test_loss),
        history=progress.history,
        seconds=time.perf_counter() - started,
        model=net,
    )
