"""The training run: data -> model -> fit -> test evaluation -> checkpoint."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import platform
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import __version__, checkpoint, data, distribute
from cnnmnist import resume as resume_state
from cnnmnist.errors import CheckpointError, CnnmnistError, Interrupted
from cnnmnist.presets import Preset

# A mean cross-entropy this large puts e^-10000 on the true class: the weights have blown up
# even while the number is still finite (Adam at lr 1000 gets here, then ReLUs die silently).
EXPLODED_LOSS = 1e4
# Training steps per tf.function call (Keras calls it steps_per_execution): fewer Python
# round trips (measured +5-12% over 1 step per call on the reference model), while Ctrl-C,
# the divergence check and the progress bar still react within about a second.
CHUNK = 50
# A test accuracy under this (chance is 10%), or this far under the last epoch's training
# accuracy, means the served model is broken, whatever training reported: say so loudly.
NEAR_CHANCE = 0.2
FAR_BELOW_TRAINING = 0.25
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})  # CPU flags of native bfloat16 math


class TrainingDiverged(CnnmnistError):
    """The loss became NaN, infinite, or exploded past EXPLODED_LOSS."""


@dataclass
class TrainResult:
    """What a finished run produced (the in-memory model is kept for callers and tests)."""

    checkpoint: Path | None  # None on a multi-worker run's other workers: the chief writes
    preset: str
    epochs: int
    test_accuracy: float
    test_loss: float
    history: list[dict[str, Any]]
    seconds: float
    model: Any = field(default=None, repr=False)
    worker: distribute.Role = field(default_factory=distribute.Role)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The --json report."""
        return {
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "preset": self.preset,
            "epochs": self.epochs,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "history": self.history,
            "seconds": round(self.seconds, 3),
            "worker": {"index": self.worker.index, "of": self.worker.workers},
            "warnings": self.warnings,
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


def safekeeping(save_epoch):
    """A callback that stops at the first non-finite loss or a Ctrl-C (at the end of the
    running chunk of CHUNK steps), and otherwise calls save_epoch(epoch) after every
    completed epoch."""
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
    """The first Ctrl-C asks training to stop within CHUNK steps; a second one aborts at once."""
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


def served_model(net, recipe: Preset, distributed: bool):
    """The trained model as the checkpoint serves it: float32, on no distribution strategy.

    Mixed-precision training keeps float32 weights; serving them in float32 is portable
    (bfloat16 kernels exist only on some CPUs), at least as accurate, and convertible to
    TFLite. A model trained under a strategy is copied out of it, so the export is the same
    as a single-process run's.
    """
    from cnnmnist import model as models

    if net.dtype_policy.name == "float32" and not distributed:
        return net
    with global_policy("float32"):
        twin = models.build(recipe)
    twin.set_weights(net.get_weights())
    return twin


def settle_batch_norm(served, net, images) -> None:
    """Give the served model's batch norm its population statistics over training images
    (see model.settle_batch_norm), and the saved training model the same ones."""
    from cnnmnist import model as models

    if not models.settle_batch_norm(served, images) or served is net:
        return
    for layer in served.layers:
        if hasattr(layer, "moving_mean"):
            twin = net.get_layer(layer.name)
            twin.moving_mean.assign(layer.moving_mean.numpy())
            twin.moving_variance.assign(layer.moving_variance.numpy())


def sanity_warnings(test_accuracy: float, history: list[dict[str, Any]]) -> list[str]:
    """What a user must hear about a finished run's test accuracy: near chance, or far below
    what training reached (the served model does not compute what was trained)."""
    warnings = []
    trained = history[-1]["accuracy"] if history else None
    if test_accuracy < NEAR_CHANCE:
        warnings.append(
            f"test accuracy {test_accuracy:.2%} is near chance (10%): this checkpoint "
            "does not read digits"
        )
    elif trained is not None and test_accuracy < trained - FAR_BELOW_TRAINING:
        warnings.append(
            f"test accuracy {test_accuracy:.2%} is far below the last epoch's training "
            f"accuracy {trained:.2%}: the served model does not compute what was trained"
        )
    return warnings


def compile_model(recipe: Preset, steps_per_epoch: int = 1):
    """Build and compile the preset's model: the loop trains with its optimizer, and the
    compile settings travel in model.keras so that --resume restores the optimizer."""
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
    strategy: str = "auto",
    devices: tuple[str, ...] = (),
    tensorboard: Path | None = None,
    live_progress: bool | None = None,
) -> TrainResult:
    """Train a recipe (or resume the interrupted run at `out`) and write its checkpoint."""
    out = Path(out)
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise CnnmnistError(
            "--tensorboard needs the tensorboard package: pip install 'cnnmnist[tensorboard]'"
        )
    role = distribute.role(strategy)  # a bad TF_CONFIG fails here, before TensorFlow loads
    try:
        return _run_as(
            role,
            recipe,
            out,
            force,
            resume,
            tensorboard,
            dataset=dataset,
            data_dir=data_dir,
            device=device,
            strategy=strategy,
            devices=devices,
            live_progress=live_progress,
        )
    except Exception as e:
        failure = distribute.failure(e, role)  # TensorFlow's runtime errors, as one line
        if failure is None:
            raise
        raise failure from None


def _run_as(role, recipe, out, force, resume, tensorboard, **options) -> TrainResult:
    run = functools.partial(_train, recipe, role=role, **options)
    if not role.chief:
        # The other workers compute every step with the chief but write only to a scratch
        # directory, deleted at the end; a resumed run reads the chief's state (shared storage).
        state = resume_state.load_state(out) if resume else None
        if resume and state is None:
            raise CnnmnistError(
                f"{resume_state.partial_dir(out)}: worker {role.index} cannot see the "
                "interrupted run; a multi-worker --resume needs --out on storage that every "
                "worker can read"
            )
        with tempfile.TemporaryDirectory(prefix="cnnmnist-worker-") as scratch:
            return run(state, source=out, out=Path(scratch) / out.name, force=True)
    with resume_state.lock(out):
        checkpoint.recover(out)
        state = resume_state.load_state(out)
        if resume and state is None:
            raise CnnmnistError(
                f"{resume_state.partial_dir(out)}: no interrupted run to resume here"
            )
        if state is not None and not resume:
            raise CnnmnistError(
                f"{resume_state.partial_dir(out)}: holds an interrupted run (epoch "
                f"{state['epoch']} of {state['recipe']['epochs']}); continue it with "
                f"`cnnmnist train --resume --out {shlex.quote(str(out))}`, or delete that "
                "directory to start over"
            )
        if out.exists() and not force:  # fail before minutes of training, not after
            raise CheckpointError(f"{out}: already exists; pass --force to replace it")
        return run(state, source=out, out=out, force=force, tensorboard=tensorboard)


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


def _train(
    recipe: Preset | None,
    state: dict[str, Any] | None,
    *,
    source: Path,
    out: Path,
    force: bool,
    dataset: str,
    data_dir: Path | None,
    device: str,
    strategy: str,
    devices: tuple[str, ...],
    role: distribute.Role,
    live_progress: bool | None,
    tensorboard: Path | None = None,
) -> TrainResult:
    """Train (from `source`'s resume state, if any) and write the checkpoint to `out`."""
    started = time.perf_counter()
    if state:
        recipe = Preset(**state["recipe"])
        dataset = state["options"]["dataset"]
        data_dir = data_dir or state["options"]["data_dir"]
    ds = data.load(dataset, data_dir)

    import tensorflow as tf

    configure_device(device)
    engine = distribute.strategy(strategy, devices)  # before any op: multi-worker needs that
    has_gpu = bool(tf.config.list_logical_devices("GPU"))
    policy = resolve_precision(recipe.precision, cpu_flags(), has_gpu)
    options = {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None}
    run = Run(recipe, state, source, out, force, engine, role, policy, options, started)
    with global_policy(policy):
        return run.fit_and_write(ds, tensorboard, live_progress)


@dataclass
class Run:
    """One training run's settings, from the model to the written checkpoint."""

    recipe: Preset
    state: dict[str, Any] | None
    source: Path  # where the resume state was read
    out: Path  # where this process writes (a scratch directory on workers other than the chief)
    force: bool
    strategy: Any
    role: distribute.Role
    policy: str
    options: dict[str, Any]
    started: float

    def fit_and_write(self, ds, tensorboard: Path | None, live: bool | None) -> TrainResult:
        """Fit, evaluate on the test set, write the checkpoint, drop the resume state."""
        import keras

        from cnnmnist import loop
        from cnnmnist.console import progress_callback

        recipe, out, strategy = self.recipe, self.out, self.strategy
        keras.utils.set_random_seed(recipe.seed)
        x_train, y_train = ds.split("train", recipe.validation_size)
        if recipe.train_size:
            x_train, y_train = x_train[: recipe.train_size], y_train[: recipe.train_size]
        replicas = strategy.num_replicas_in_sync
        steps = loop.steps_per_epoch(len(x_train), recipe.batch_size, replicas)
        first_epoch = self.state["epoch"] if self.state else 0
        with strategy.scope():
            net = (
                resume_state.restore(self.source, self.state)
                if self.state
                else compile_model(recipe, steps)
            )
            trainer = loop.Loop(
                net, strategy, recipe.batch_size, CHUNK, label_smoothing=recipe.label_smoothing
            )
        progress = progress_callback(recipe.epochs, steps, live=live)
        progress.history = list(self.state["history"]) if self.state else []
        keeper = safekeeping(
            lambda epoch: resume_state.save(net, out, epoch, progress.history, recipe, self.options)
        )
        callbacks = [progress, keeper]  # progress first: the saved history includes this epoch
        if tensorboard:
            callbacks.append(
                keras.callbacks.TensorBoard(log_dir=str(tensorboard), write_graph=False)
            )
        validation = (
            ds.split("validation", recipe.validation_size) if recipe.validation_size else None
        )
        if first_epoch < recipe.epochs:
            with sigint_to(keeper):
                trainer.fit(
                    lambda context: loop.training_batches(
                        x_train,
                        y_train,
                        recipe.batch_size,
                        recipe.seed,
                        range(first_epoch, recipe.epochs),
                        loop.Shard.of(context),
                    ),
                    range(first_epoch, recipe.epochs),
                    steps,
                    keras.callbacks.CallbackList(callbacks, model=net),
                    validation,
                )
        self._check_stopped(keeper, first_epoch)
        served = served_model(net, recipe, distributed=strategy is not _default_strategy())
        settle_batch_norm(served, net, x_train)
        test_loss, test_accuracy = loop.Evaluation(served, _default_strategy())(
            ds.test_images, ds.test_labels
        )
        warnings = sanity_warnings(test_accuracy, progress.history)
        metadata = self._metadata(ds, len(x_train), progress.history, test_loss, test_accuracy)
        metadata["warnings"] = warnings
        checkpoint.write(
            net, out, metadata, overwrite=self.force, check_images=ds.test_images, served=served
        )
        resume_state.discard(out)
        return TrainResult(
            checkpoint=out if self.role.chief else None,
            preset=recipe.name,
            epochs=recipe.epochs,
            test_accuracy=test_accuracy,
            test_loss=test_loss,
            history=progress.history,
            seconds=time.perf_counter() - self.started,
            model=net,
            worker=self.role,
            warnings=warnings,
        )

    def _check_stopped(self, keeper, first_epoch: int) -> None:
        """Raise if training stopped early: diverged, or interrupted by Ctrl-C."""
        recipe, out = self.recipe, self.source
        done = max(keeper.completed, first_epoch)
        if keeper.diverged:
            epoch, step, loss = keeper.diverged
            raise TrainingDiverged(
                f"training diverged: the loss became {loss:.4g} at epoch {epoch}, step {step}; "
                f"try a lower --learning-rate than {recipe.learning_rate:g}. Nothing was "
                f"written to {out}"
                + (
                    f"; the state after epoch {done} is kept in {resume_state.partial_dir(out)} "
                    "(delete it to start over)"
                    if done
                    else ""
                )
            )
        if keeper.interrupted:
            where = (
                f"after epoch {done} of {recipe.epochs}" if done else "before the first epoch ended"
            )
            raise Interrupted(
                f"interrupted {where}; continue with: cnnmnist train --resume --out "
                f"{shlex.quote(str(out))}"
            )

    def _metadata(self, ds, train_size, history, test_loss, test_accuracy) -> dict[str, Any]:
        """What cnnmnist.json records about the run."""
        import keras
        import tensorflow as tf

        recipe = self.recipe
        return {
            "preset": recipe.name,
            "hyperparameters": recipe.hyperparameters(),
            "dtype_policy": self.policy,
            "seed": recipe.seed,
            "distribution": {
                "strategy": type(self.strategy).__name__,
                "replicas": self.strategy.num_replicas_in_sync,
                "workers": self.role.workers,
            },
            "dataset": {
                "name": ds.name,
                "source": str(ds.source),
                "checksums": ds.checksums,
                "train_size": train_size,
                "validation_size": recipe.validation_size,
                "test_size": len(ds.test_images),
            },
            "history": history,
            "test": {"accuracy": test_accuracy, "loss": test_loss, "n": len(ds.test_images)},
            "reference_accuracy": recipe.reference_accuracy,
            "versions": {
                "cnnmnist": __version__,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "training_seconds": round(time.perf_counter() - self.started, 3),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "signature": {
                "name": checkpoint.SIGNATURE,
                "input": "pixels: float32 [N, 28, 28, 1], raw values 0..255, white digit on black",
                "output": "probabilities: float32 [N, 10]",
            },
        }


def _default_strategy():
    import tensorflow as tf

    return tf.distribute.get_strategy()
