"""The training run: data -> model -> fit -> test evaluation -> checkpoint."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import platform
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import __version__, checkpoint, data
from cnnmnist import resume as resume_state
from cnnmnist.errors import CheckpointError, CnnmnistError, Interrupted
from cnnmnist.presets import Preset

# A mean cross-entropy this large puts e^-10000 on the true class: the weights have blown up
# even while the number is still finite (Adam at lr 1000 gets here, then ReLUs die silently).
EXPLODED_LOSS = 1e4
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})  # CPU flags of native bfloat16 math


class TrainingDiverged(CnnmnistError):
    """The loss became NaN, infinite, or exploded past EXPLODED_LOSS."""


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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(choice: str, flags: set[str], has_gpu: bool) -> str:
    """The Keras dtype policy for --precision; 'auto' picks what this hardware runs fast.

    bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX), else it is
    emulated and slower than float32; float16 on GPUs (tensor cores).
    """
    if choice == "auto":
        if has_gpu:
            return "mixed_float16"
        return "mixed_bfloat16" if flags & NATIVE_BF16 else "float32"
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[choice]


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


def safekeeping(save_epoch):
    """A callback that stops at the first non-finite loss or a Ctrl-C, at a batch boundary,
    and otherwise calls save_epoch(epoch) after every completed epoch."""
    import keras

    class Safekeeping(keras.callbacks.Callback):
        diverged: tuple[int, int, float] | None = None
        interrupted = False
        completed = 0  # epochs whose state is saved

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            loss = float((logs or {}).get("loss", 0.0))
            if not math.isfinite(loss) or loss > EXPLODED_LOSS:
                self.diverged = (self._epoch + 1, batch + 1, loss)
            if self.diverged or self.interrupted:
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if not (self.diverged or self.interrupted):  # a cut-short epoch is not saved
                save_epoch(epoch + 1)
                self.completed = epoch + 1

    return Safekeeping()


@contextlib.contextmanager
def sigint_to(keeper) -> Iterator[None]:
    """The first Ctrl-C asks training to stop at the next batch; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        keeper.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def float32_twin(net, recipe: Preset):
    """The trained model computing in float32: what the checkpoint serves and is tested as.

    Mixed-precision training keeps float32 weights; serving them in float32 is portable
    (bfloat16 kernels exist only on some CPUs), at least as accurate, and convertible to TFLite.
    """
    if net.dtype_policy.name == "float32":
        return net
    with global_policy("float32"):
        twin = compile_model(recipe)
    twin.set_weights(net.get_weights())
    return twin


def compile_model(recipe: Preset, steps_per_epoch: int = 1):
    """Build and compile the preset's model (loss on logits, accuracy metric)."""
    import keras

    from cnnmnist import model as models

    net = models.build(recipe)
    rate = models.learning_rate(
        recipe.learning_rate, recipe.schedule, steps_per_epoch * recipe.epochs
    )
    net.compile(
        optimizer=models.optimizer(recipe.optimizer, rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return net


def run(
    recipe: Preset | None,
    *,
    dataset: str = "mnist",
    data_dir: Path | None = None,
    out: Path = Path("ckpt"),
    force: bool = False,
    resume: bool = False,
    device: str = "auto",
    tensorboard: Path | None = None,
    live_progress: bool | None = None,
) -> TrainResult:
    """Train a recipe (or resume the interrupted run at `out`) and write its checkpoint."""
    out = Path(out)
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise CnnmnistError(
            "--tensorboard needs the tensorboard package: pip install 'cnnmnist[tensorboard]'"
        )
    with resume_state.lock(out):
        checkpoint.recover(out)
        state = resume_state.load_state(out)
        if resume:
            if state is None:
                raise CnnmnistError(
                    f"{resume_state.partial_dir(out)}: no interrupted run to resume here"
                )
            recipe = Preset(**state["recipe"])
            dataset = state["options"]["dataset"]
            data_dir = data_dir or state["options"]["data_dir"]
        elif state is not None:
            raise CnnmnistError(
                f"{resume_state.partial_dir(out)}: holds an interrupted run (epoch "
                f"{state['epoch']} of {state['recipe']['epochs']}); continue it with "
                f"`cnnmnist train --resume --out {shlex.quote(str(out))}`, or delete that "
                "directory to start over"
            )
        if out.exists() and not force:  # fail before minutes of training, not after
            raise CheckpointError(f"{out}: already exists; pass --force to replace it")
        return _train(
            recipe, state, dataset, data_dir, out, force, device, tensorboard, live_progress
        )


@contextlib.contextmanager
def global_policy(name: str) -> Iterator[None]:
    """Keras's dtype policy is a global: set it for the run, then leave it as found."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _train(recipe, state, dataset, data_dir, out, force, device, tensorboard, live_progress):
    started = time.perf_counter()
    ds = data.load(dataset, data_dir)

    import tensorflow as tf

    configure_device(device)
    has_gpu = bool(tf.config.list_logical_devices("GPU"))
    policy = resolve_precision(recipe.precision, cpu_flags(), has_gpu)
    options = {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None}
    with global_policy(policy):
        return _fit_and_write(
            recipe, state, ds, options, out, force, tensorboard, live_progress, started, policy
        )


def _fit_and_write(
    recipe, state, ds, options, out, force, tensorboard, live_progress, started, policy
):
    import keras
    import tensorflow as tf

    from cnnmnist.console import progress_callback

    keras.utils.set_random_seed(recipe.seed)
    x_train, y_train = ds.split("train", recipe.validation_size)
    if recipe.train_size:
        x_train, y_train = x_train[: recipe.train_size], y_train[: recipe.train_size]
    if len(x_train) == 0:
        raise CnnmnistError(f"validation_size {recipe.validation_size} leaves no training images")
    steps = math.ceil(len(x_train) / recipe.batch_size)
    first_epoch = state["epoch"] if state else 0
    val_ds = (
        fixed_batches(*ds.split("validation", recipe.validation_size))
        if recipe.validation_size
        else None
    )

    net = resume_state.restore(out, state) if state else compile_model(recipe, steps)
    progress = progress_callback(recipe.epochs, steps, live=live_progress)
    progress.history = list(state["history"]) if state else []
    keeper = safekeeping(
        lambda epoch: resume_state.save(net, out, epoch, progress.history, recipe, options)
    )
    callbacks = [progress, keeper]  # progress first: the saved history includes this epoch
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard)))
    if first_epoch < recipe.epochs:
        with sigint_to(keeper):
            net.fit(
                pipeline(
                    x_train,
                    y_train,
                    recipe.batch_size,
                    recipe.seed,
                    range(first_epoch, recipe.epochs),
                ),
                epochs=recipe.epochs,
                initial_epoch=first_epoch,
                steps_per_epoch=steps,
                validation_data=val_ds,
                callbacks=callbacks,
                shuffle=False,  # the pipeline already shuffles, reproducibly
                verbose=0,
            )
    if keeper.diverged:
        epoch, step, loss = keeper.diverged
        kept = max(keeper.completed, first_epoch)
        raise TrainingDiverged(
            f"training diverged: the loss became {loss:.4g} at epoch {epoch}, step {step}; "
            f"try a lower --learning-rate than {recipe.learning_rate:g}. Nothing was written "
            f"to {out}"
            + (
                f"; the state after epoch {kept} is kept in {resume_state.partial_dir(out)} "
                "(delete it to start over)"
                if kept
                else ""
            )
        )
    if keeper.interrupted:
        done = max(keeper.completed, first_epoch)
        where = f"after epoch {done} of {recipe.epochs}" if done else "before the first epoch ended"
        raise Interrupted(
            f"interrupted {where}; continue with: cnnmnist train --resume --out "
            f"{shlex.quote(str(out))}"
        )
    served = float32_twin(net, recipe)
    test_loss, test_accuracy = served.evaluate(
        fixed_batches(ds.test_images, ds.test_labels), verbose=0
    )
    seconds = time.perf_counter() - started
    metadata = {
        "preset": recipe.name,
        "hyperparameters": recipe.hyperparameters(),
        "dtype_policy": policy,
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
    checkpoint.write(
        net, out, metadata, overwrite=force, check_images=ds.test_images, served=served
    )
    resume_state.discard(out)
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
