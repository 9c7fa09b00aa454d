"""The training run, as a few named steps: where to write -> data -> model -> fit -> the
served model and its test accuracy -> checkpoint. `run` tells the whole story."""

from __future__ import annotations

import contextlib
import importlib.util
import platform
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import __version__, checkpoint, data, distribute, runtime, styles
from cnnmnist import resume as resume_state
from cnnmnist.errors import CheckpointError, CnnmnistError, Interrupted, UsageError
from cnnmnist.presets import Preset

# A test accuracy under this (chance is 10%), or this far under the last epoch's training
# accuracy, means the served model is broken, whatever training reported: say so loudly.
NEAR_CHANCE = 0.2
FAR_BELOW_TRAINING = 0.25


class TrainingDiverged(CnnmnistError):
    """The loss became NaN, infinite, or exploded past callbacks.EXPLODED_LOSS."""


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


@dataclass(frozen=True)
class Options:
    """How to run, beside the recipe: data, devices, and what the user asked of --out."""

    dataset: str = "mnist"
    data_dir: Path | None = None
    out: Path = Path("ckpt")
    force: bool = False
    resume: bool = False
    device: str = "auto"
    strategy: str = "auto"
    devices: tuple[str, ...] = ()
    tensorboard: Path | None = None
    live_progress: bool | None = None
    # With --resume: the recipe fields the user gave, which must equal the recorded ones.
    expected: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Destination:
    """Where this process reads and writes. Only the chief writes what the user sees."""

    source: Path  # the user's --out: the resume state is read beside it
    out: Path  # where this process writes (a scratch directory on other workers)
    force: bool
    tensorboard: Path | None


def run(recipe: Preset | None, options: Options) -> TrainResult:
    """Train a recipe (or resume the interrupted run at options.out), write its checkpoint."""
    if options.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise CnnmnistError(
            "--tensorboard needs the tensorboard package: pip install 'cnnmnist[tensorboard]'"
        )
    role = distribute.role(options.strategy)  # a bad TF_CONFIG fails here, before TensorFlow
    try:
        with destination(role, options) as (where, state):
            if state is not None:
                recipe = Preset(**state["recipe"])
                options = _recorded_options(options, state)
            return train(recipe, state, where, role, options)
    except Exception as e:
        failure = distribute.failure(e, role)  # TensorFlow's runtime errors, as one line
        if failure is None:
            raise
        raise failure from None


@contextlib.contextmanager
def destination(
    role: distribute.Role, options: Options
) -> Iterator[tuple[Destination, dict[str, Any] | None]]:
    """The one place that decides where this process writes, and with which resume state.

    The chief locks --out, checks it may be written and writes it. The other workers compute
    every step with it but write to a scratch directory deleted at the end (TensorBoard
    logs too); a resumed run reads the chief's state, so --out must be on shared storage.
    """
    out = Path(options.out)
    if not role.chief:
        state = resume_state.load_state(out) if options.resume else None
        if options.resume and state is None:
            raise CnnmnistError(
                f"{resume_state.partial_dir(out)}: worker {role.index} cannot see the "
                "interrupted run; a multi-worker --resume needs --out on storage that every "
                "worker can read"
            )
        with tempfile.TemporaryDirectory(prefix="cnnmnist-worker-") as scratch:
            logs = Path(scratch) / "tensorboard" if options.tensorboard else None
            yield Destination(out, Path(scratch) / out.name, True, logs), state
        return
    with resume_state.lock(out):
        checkpoint.recover(out)
        state = _interrupted_run(out, options)
        if out.exists() and not options.force:  # fail before minutes of training, not after
            raise CheckpointError(f"{out}: already exists; pass --force to replace it")
        checkpoint.check_replaceable(out)
        yield Destination(out, out, options.force, options.tensorboard), state


def _interrupted_run(out: Path, options: Options) -> dict[str, Any] | None:
    """The state to resume from: with --resume, the recorded one (which the flags given must
    match); with --force, none (an interrupted run is discarded, and the user told)."""
    from cnnmnist.console import err

    partial = resume_state.partial_dir(out)
    if options.force and not options.resume and partial.exists():
        try:
            state = resume_state.load_state(out)
            what = f"epoch {state['epoch']} of {state['recipe']['epochs']}" if state else "empty"
        except CnnmnistError:
            what = "unreadable"
        resume_state.discard(out)
        err().print(f"--force: discarded the interrupted run in {partial} ({what})", soft_wrap=True)
        return None
    state = resume_state.load_state(out)
    if options.resume and state is None:
        raise CnnmnistError(f"{partial}: no interrupted run to resume here")
    if state is not None and not options.resume:
        raise CnnmnistError(
            f"{partial}: holds an interrupted run (epoch {state['epoch']} of "
            f"{state['recipe']['epochs']}); continue it with `{_resume_command(out, False)}`, "
            "or pass --force to discard it and start over"
        )
    if state is not None:
        _check_expected(state, options.expected, partial)
    return state


def _check_expected(state: dict[str, Any], expected: dict[str, Any], partial: Path) -> None:
    """--resume accepts the recorded recipe's own values; a differing one is a usage error."""
    recorded = {**state["recipe"], "preset": state["recipe"]["name"]}
    recorded["dataset"] = state["options"]["dataset"]
    for key, value in expected.items():
        if recorded.get(key) != value:
            raise UsageError(
                f"--{key.replace('_', '-')} {value}: the interrupted run in {partial} was "
                f"started with {recorded.get(key)!r}; --resume continues it as recorded "
                "(drop the flag, or pass --force to start over)"
            )


def _recorded_options(options: Options, state: dict[str, Any]) -> Options:
    """A resumed run reads the dataset it started with (from where it was, unless told)."""
    from dataclasses import replace

    recorded_dir = state["options"]["data_dir"]
    return replace(
        options,
        dataset=state["options"]["dataset"],
        data_dir=options.data_dir or (Path(recorded_dir) if recorded_dir else None),
    )


def train(
    recipe: Preset,
    state: dict[str, Any] | None,
    where: Destination,
    role: distribute.Role,
    options: Options,
) -> TrainResult:
    """Fit the recipe (from `state`, if resuming), evaluate, and write the checkpoint."""
    started = time.perf_counter()
    ds = data.load(options.dataset, options.data_dir)
    runtime.configure_device(options.device)
    engine = distribute.strategy(options.strategy, options.devices)  # before any other op
    policy = runtime.precision_policy(recipe.precision)
    with runtime.global_policy(policy):
        x_train, y_train, flagged = training_split(ds, recipe)
        net, history = fit(recipe, state, where, engine, x_train, y_train, ds, options)
        try:  # Ctrl-C from here on: every epoch is saved, --resume writes the checkpoint
            served = served_model(net, recipe, engine, x_train)
            test_loss, test_accuracy = evaluate(served, ds)
            warnings = sanity_warnings(test_accuracy, history)
            meta = metadata(
                recipe, ds, len(x_train), flagged, history, policy, engine, role, started
            )
            meta |= {
                "test": {"accuracy": test_accuracy, "loss": test_loss, "n": len(ds.test_labels)}
            }
            meta["warnings"] = warnings
            checkpoint.write(
                net,
                where.out,
                meta,
                overwrite=where.force,
                check_images=ds.test_images,
                served=served,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted while writing the checkpoint; continue with: "
                f"{_resume_command(where.source, where.force)}"
            ) from None
    resume_state.discard(where.out)
    return TrainResult(
        checkpoint=where.out if role.chief else None,
        preset=recipe.name,
        epochs=recipe.epochs,
        test_accuracy=test_accuracy,
        test_loss=test_loss,
        history=history,
        seconds=time.perf_counter() - started,
        model=net,
        worker=role,
        warnings=warnings,
    )


def training_split(ds, recipe: Preset) -> tuple[np.ndarray, np.ndarray, int]:
    """The images the recipe trains on (after the validation ones, the first train_size),
    their labels, and how many of its 1s were given a flag (digits only: on another dataset
    label 1 is something else)."""
    x, y = ds.split("train", recipe.validation_size)
    if recipe.train_size:
        x, y = x[: recipe.train_size], y[: recipe.train_size]
    if data.spec(ds.name).classes != data.DIGITS:
        return x, y, 0
    x, flagged = styles.with_flagged_ones(x, y, recipe.flagged_ones, recipe.seed)
    return x, y, flagged


def fit(recipe, state, where: Destination, engine, x_train, y_train, ds, options: Options):
    """Train the model from scratch or from `state` to the recipe's last epoch, saving the
    state after each one; returns the model and the history. Stopping early raises."""
    import keras

    from cnnmnist import loop, model, pipeline
    from cnnmnist.callbacks import safekeeping, sigint_to
    from cnnmnist.console import progress_callback

    keras.utils.set_random_seed(recipe.seed)
    steps = pipeline.steps_per_epoch(len(x_train), recipe.batch_size, engine.num_replicas_in_sync)
    first_epoch = state["epoch"] if state else 0
    with engine.scope():
        if state:
            net = resume_state.restore(where.source, state)
        else:
            net = model.compile_model(recipe, steps)
        trainer = loop.Loop(
            net,
            engine,
            recipe.batch_size,
            label_smoothing=recipe.label_smoothing,
            clean=(
                model.without_augmentation(net)
                if recipe.first_clean_epoch < recipe.epochs
                else None
            ),
            clean_from=recipe.first_clean_epoch,
        )
    progress = progress_callback(
        recipe.epochs, steps, history=state["history"] if state else [], live=options.live_progress
    )
    recorded = {"dataset": ds.name, "data_dir": str(options.data_dir) if options.data_dir else None}
    keeper = safekeeping(
        lambda epoch: resume_state.save(net, where.out, epoch, progress.history, recipe, recorded)
    )
    callbacks = [progress, keeper]  # progress first: the saved history includes this epoch
    if where.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(where.tensorboard), write_graph=False))
    validation = ds.split("validation", recipe.validation_size) if recipe.validation_size else None
    epochs = range(first_epoch, recipe.epochs)
    if len(epochs):
        with sigint_to(keeper):
            trainer.fit_arrays(x_train, y_train, recipe.seed, epochs, callbacks, validation)
    _raise_if_stopped(keeper, recipe, where, done=max(keeper.completed, first_epoch))
    return net, progress.history


def _raise_if_stopped(keeper, recipe: Preset, where: Destination, done: int) -> None:
    """Raise if training stopped early: diverged, or interrupted by Ctrl-C."""
    partial = resume_state.partial_dir(where.source)
    if keeper.diverged:
        epoch, step, loss = keeper.diverged
        kept = (
            f"; the state after epoch {done} is kept in {partial} (delete it, or pass "
            "--force, to start over)"
            if done
            else ""
        )
        raise TrainingDiverged(
            f"training diverged: the loss became {loss:.4g} at epoch {epoch}, step {step}; "
            f"try a lower --learning-rate than {recipe.learning_rate:g}. Nothing was written "
            f"to {where.source}{kept}"
        )
    if keeper.interrupted and done:
        raise Interrupted(
            f"interrupted after epoch {done} of {recipe.epochs}; continue with: "
            f"{_resume_command(where.source, where.force)}"
        )
    if keeper.interrupted:
        raise Interrupted(
            "interrupted before the first epoch ended; nothing was saved: run the same "
            "command again to start over"
        )


def _resume_command(out: Path, force: bool) -> str:
    """The command that continues the interrupted run writing `out`."""
    # --force is needed again when the run was replacing a checkpoint that is still there.
    again = " --force" if force and out.exists() else ""
    return f"cnnmnist train --resume --out {shlex.quote(str(out))}{again}"


def served_model(net, recipe: Preset, engine, x_train):
    """The trained model as the checkpoint serves it: float32, on no distribution strategy,
    with batch norm's statistics measured over training images.

    Mixed-precision training keeps float32 weights; serving them in float32 is portable
    (bfloat16 kernels exist only on some CPUs), at least as accurate, and convertible to
    TFLite. A model trained under a strategy is copied out of it, so the export is the same
    as a single-process run's. The training model gets the same statistics (model.keras).
    """
    from cnnmnist import model

    served = net
    if net.dtype_policy.name != "float32" or engine is not _default_strategy():
        with runtime.global_policy("float32"):
            served = model.build(recipe)
        served.set_weights(net.get_weights())
    if model.settle_batch_norm(served, x_train) and served is not net:
        for layer in served.layers:
            if hasattr(layer, "moving_mean"):
                twin = net.get_layer(layer.name)
                twin.moving_mean.assign(layer.moving_mean.numpy())
                twin.moving_variance.assign(layer.moving_variance.numpy())
    return served


def evaluate(served, ds) -> tuple[float, float]:
    """The served model's mean cross-entropy and accuracy on the test images."""
    from cnnmnist import loop

    return loop.Evaluation(served, _default_strategy())(ds.test_images, ds.test_labels)


def sanity_warnings(test_accuracy: float, history: list[dict[str, Any]]) -> list[str]:
    """What a user must hear about a finished run's test accuracy: near chance, or far below
    what training reached (the served model does not compute what was trained)."""
    trained = history[-1]["accuracy"] if history else None
    if test_accuracy < NEAR_CHANCE:
        return [
            f"test accuracy {test_accuracy:.2%} is near chance (10%): this checkpoint "
            "does not read digits"
        ]
    if trained is not None and test_accuracy < trained - FAR_BELOW_TRAINING:
        return [
            f"test accuracy {test_accuracy:.2%} is far below the last epoch's training "
            f"accuracy {trained:.2%}: the served model does not compute what was trained"
        ]
    return []


def metadata(
    recipe, ds, train_size, flagged_ones, history, policy, engine, role, started
) -> dict[str, Any]:
    """What cnnmnist.json records about the run (the test result is added by the caller)."""
    import keras
    import tensorflow as tf

    return {
        "preset": recipe.name,
        "hyperparameters": recipe.hyperparameters(),
        "dtype_policy": policy,
        "seed": recipe.seed,
        "distribution": {
            "strategy": type(engine).__name__,
            "replicas": engine.num_replicas_in_sync,
            "workers": role.workers,
        },
        "dataset": {
            "name": ds.name,
            "source": str(ds.source),
            "checksums": ds.checksums,
            "train_size": train_size,
            "flagged_ones": flagged_ones,  # training 1s given a flag (styles)
            "validation_size": recipe.validation_size,
            "test_size": len(ds.test_images),
        },
        "history": history,
        "reference_accuracy": recipe.reference_accuracy,
        "versions": {
            "cnnmnist": __version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "training_seconds": round(time.perf_counter() - started, 3),
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
