"""The training run, as named steps: where to write -> data -> devices and precision -> the
network, trained -> the served network and its test accuracy -> the checkpoint. `train`
tells the whole story; each step takes the one `Run` it adds to."""

from __future__ import annotations

import contextlib
import importlib.util
import platform
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cnnmnist import __version__, checkpoint, cluster, data, export, files, render
from cnnmnist.errors import CheckpointError, CnnmnistError, Interrupted, UsageError
from cnnmnist.model import without_augmentation
from cnnmnist.presets import Preset
from cnnmnist.training import distribute, loop, network, pipeline, runtime, styles
from cnnmnist.training import resume as resume_state
from cnnmnist.training.callbacks import Safekeeping, sigint_to
from cnnmnist.training.progress import Progress

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
    worker: cluster.Role = field(default_factory=cluster.Role)
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


@dataclass
class Run:
    """One run as its steps fill it in: what it trains, where, on what, and how."""

    recipe: Preset
    options: Options
    where: Destination
    role: cluster.Role
    state: dict[str, Any] | None  # the recorded state of the run being resumed
    started: float = field(default_factory=time.perf_counter)
    dataset: data.Dataset | None = None
    strategy: Any = None  # tf.distribute.Strategy
    policy: str = "float32"
    images: np.ndarray | None = None  # what it trains on, after the validation images
    labels: np.ndarray | None = None
    flagged: int = 0  # training 1s redrawn with a flag (styles)
    boxed: int = 0  # training digits stored as box-normalised scans (styles)

    @property
    def steps(self) -> int:
        """Training steps per epoch."""
        return pipeline.steps_per_epoch(
            len(self.images), self.recipe.batch_size, self.strategy.num_replicas_in_sync
        )


def run(recipe: Preset | None, options: Options) -> TrainResult:
    """Train a recipe (or resume the interrupted run at options.out), write its checkpoint."""
    if options.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise CnnmnistError(
            "--tensorboard needs the tensorboard package: pip install 'cnnmnist[tensorboard]'"
        )
    role = cluster.role(options.strategy)
    try:
        with destination(role, options) as (where, state):
            if state is not None:
                recipe = Preset(**state["recipe"])
                options = _recorded_options(options, state)
            return train(Run(recipe, options, where, role, state))
    except Exception as e:
        failure = distribute.failure(e, role)  # TensorFlow's runtime errors, as one line
        if failure is None:
            raise
        raise failure from None


def train(run: Run) -> TrainResult:
    """The run's steps: data, devices, the network trained, served and tested, written."""
    load_data(run)
    set_up(run)
    with runtime.global_policy(run.policy):
        training_split(run)
        render.note(header(run))
        net, history = fit(run)
        try:  # Ctrl-C from here on: every epoch is saved, --resume writes the checkpoint
            served, test, warnings = serve_and_test(run, net, history)
            meta = metadata(run, history) | {"test": test, "warnings": warnings}
            export.write(
                net,
                run.where.out,
                meta,
                overwrite=run.where.force,
                check_images=run.dataset.test_images,
                served=served,
                step=render.status,
            )
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted while writing the checkpoint; continue with: "
                f"{_resume_command(run.where.source, run.where.force)}"
            ) from None
    resume_state.discard(run.where.out)
    return TrainResult(
        checkpoint=run.where.out if run.role.chief else None,
        preset=run.recipe.name,
        epochs=run.recipe.epochs,
        test_accuracy=test["accuracy"],
        test_loss=test["loss"],
        history=history,
        seconds=time.perf_counter() - run.started,
        model=net,
        worker=run.role,
        warnings=warnings,
    )


def serve_and_test(run: Run, net, history) -> tuple[keras.Model, dict[str, Any], list[str]]:
    """The network as the checkpoint serves it, its test result, and what the user must hear
    about that result."""
    with render.status("measuring batch norm's statistics"):
        served = network.served(net, run.recipe, run.strategy, run.images)
    images, labels = run.dataset.test_images, run.dataset.test_labels
    with render.status(f"testing on {len(labels):,} images"):
        loss, accuracy = loop.Evaluation(served, tf.distribute.get_strategy())(images, labels)
    test = {"accuracy": accuracy, "loss": loss, "n": len(labels)}
    return served, test, sanity_warnings(accuracy, history)


@contextlib.contextmanager
def destination(
    role: cluster.Role, options: Options
) -> Iterator[tuple[Destination, dict[str, Any] | None]]:
    """The one place that decides where this process writes, and with which resume state.

    The chief locks --out, checks it may be written and writes it. The other workers compute
    every step with it but write to a scratch directory deleted at the end (TensorBoard
    logs too); a resumed run reads the chief's state, so --out must be on shared storage.
    """
    out = Path(options.out)
    files.check_name(out)  # before minutes of training, not after
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
    created = files.make_dirs(out.parent)
    try:
        with files.lock(out):
            files.recover(out)
            state = _interrupted_run(out, options)
            if out.exists() and not options.force:  # fail before minutes of training
                raise CheckpointError(f"{out}: already exists; pass --force to replace it")
            checkpoint.check_replaceable(out)
            yield Destination(out, out, options.force, options.tensorboard), state
    except BaseException:
        files.remove_empty(created)  # a refused or failed run leaves no new empty folders
        raise


def _interrupted_run(out: Path, options: Options) -> dict[str, Any] | None:
    """The state to resume from: with --resume, the recorded one (which the flags given must
    match); with --force, none (an interrupted run is discarded, and the user told). A folder
    at OUT.partial that this tool did not write is refused either way."""
    resume_state.check_partial(out)
    partial = resume_state.partial_dir(out)
    if options.force and not options.resume and partial.exists():
        try:
            state = resume_state.load_state(out)
            what = f"epoch {state['epoch']} of {state['recipe']['epochs']}" if state else "empty"
        except CnnmnistError:
            what = "unreadable"
        resume_state.discard(out)
        render.note(f"--force: discarded the interrupted run in {partial} ({what})")
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
    recorded_dir = state["options"]["data_dir"]
    return replace(
        options,
        dataset=state["options"]["dataset"],
        data_dir=options.data_dir or (Path(recorded_dir) if recorded_dir else None),
    )


def load_data(run: Run) -> None:
    """The dataset, found, verified (or downloaded) and parsed."""
    with render.status(f"reading {run.options.dataset}"):
        run.dataset = data.load(run.options.dataset, run.options.data_dir)


def set_up(run: Run) -> None:
    """Devices, the distribution strategy (before any other op) and the precision."""
    with render.status("starting TensorFlow's devices"):
        runtime.configure_device(run.options.device)
        run.strategy = distribute.strategy(run.options.strategy, run.options.devices)
        run.policy = runtime.precision_policy(run.recipe.precision)


def training_split(run: Run) -> None:
    """The images the recipe trains on (after the validation ones, the first train_size),
    their labels, and how many of its 1s were given a flag (digits only: on another dataset
    label 1 is something else)."""
    recipe = run.recipe
    x, y = run.dataset.split("train", recipe.validation_size)
    if recipe.train_size:
        x, y = x[: recipe.train_size], y[: recipe.train_size]
    if data.spec(run.dataset.name).classes == data.DIGITS:
        x, run.flagged = styles.with_flagged_ones(x, y, recipe.flagged_ones, recipe.seed)
        if recipe.box_scans:
            with render.status(f"storing {recipe.box_scans:.0%} of the digits as box scans"):
                x, run.boxed = styles.with_box_scans(x, y, recipe.box_scans, recipe.seed)
    run.images, run.labels = x, y


def header(run: Run) -> str:
    """The line before training: what trains on what, on which device, in which precision."""
    recipe, strategy = run.recipe, run.strategy
    try:
        names = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: TensorFlow's first GPU, else the CPU
        names = [d.name for d in tf.config.list_logical_devices("GPU")][:1] or ["CPU:0"]
    devices = sorted({cluster.canonical(name) for name in names})
    held = f", {recipe.validation_size:,} held out" if recipe.validation_size else ""
    start = f", resuming after epoch {run.state['epoch']}" if run.state else ""
    epochs = f"{recipe.epochs} epoch{'s' if recipe.epochs != 1 else ''}"
    return (
        f"training {recipe.name} on {run.dataset.name}: {len(run.images):,} images{held}; "
        f"{epochs} of {run.steps} steps (batch {recipe.batch_size}){start}; "
        f"{', '.join(devices)}, {run.policy} -> {run.where.source}"
    )


def fit(run: Run) -> tuple[keras.Model, list[dict[str, Any]]]:
    """Train the network from scratch or from the recorded state to the recipe's last epoch,
    saving the state after each one; returns it and the history. Stopping early raises."""
    recipe, where, state = run.recipe, run.where, run.state
    keras.utils.set_random_seed(recipe.seed)
    first_epoch = state["epoch"] if state else 0
    with run.strategy.scope():
        if state:
            with render.status(f"loading the interrupted run from {where.source}.partial"):
                net = resume_state.restore(where.source, state)
        else:
            net = network.compiled(recipe, run.steps)
        trainer = loop.Loop(
            net,
            run.strategy,
            recipe.batch_size,
            label_smoothing=recipe.label_smoothing,
            clean=(
                (without_augmentation(net), recipe.first_clean_epoch)
                if recipe.first_clean_epoch < recipe.epochs
                else None
            ),
        )
    progress = Progress(
        recipe.epochs,
        run.steps,
        history=state["history"] if state else [],
        live=run.options.live_progress,
    )
    recorded = {
        "dataset": run.dataset.name,
        "data_dir": str(run.options.data_dir) if run.options.data_dir else None,
    }
    keeper = Safekeeping(
        lambda epoch: resume_state.save(net, where.out, epoch, progress.history, recipe, recorded)
    )
    callbacks = [progress, keeper]  # progress first: the saved history includes this epoch
    if where.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(where.tensorboard), write_graph=False))
    validation = (
        run.dataset.split("validation", recipe.validation_size) if recipe.validation_size else None
    )
    epochs = range(first_epoch, recipe.epochs)
    if len(epochs):
        with sigint_to(keeper):
            trainer.fit_arrays(run.images, run.labels, recipe.seed, epochs, callbacks, validation)
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


def metadata(run: Run, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What cnnmnist.json records about the run (the test result is added by the caller)."""
    recipe, ds = run.recipe, run.dataset
    return {
        "preset": recipe.name,
        "hyperparameters": recipe.hyperparameters(),
        "dtype_policy": run.policy,
        "seed": recipe.seed,
        "distribution": {
            "strategy": type(run.strategy).__name__,
            "replicas": run.strategy.num_replicas_in_sync,
            "workers": run.role.workers,
        },
        "dataset": {
            "name": ds.name,
            "source": str(ds.source),
            "checksums": ds.checksums,
            "train_size": len(run.images),
            "flagged_ones": run.flagged,  # training 1s given a flag (styles)
            "box_scans": run.boxed,  # training digits stored as box scans (styles)
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
        "training_seconds": round(time.perf_counter() - run.started, 3),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "signature": {
            "name": checkpoint.SIGNATURE,
            "input": "pixels: float32 [N, 28, 28, 1], raw values 0..255, white digit on black",
            "output": "probabilities: float32 [N, 10]",
        },
    }
