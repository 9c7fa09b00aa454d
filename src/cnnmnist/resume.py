"""The state of a run in progress: saved every epoch beside the checkpoint, locked to one writer.

`OUT.partial/` holds the last completed epoch (Keras model with optimizer state, the dropout
RNG state, history, the resolved recipe). It sits beside OUT, not inside it, so a previous
good checkpoint at OUT stays untouched until the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cnnmnist import schema
from cnnmnist.errors import CnnmnistError, UsageError
from cnnmnist.presets import DATASETS, Preset

STATE = "state.json"
MODEL_FILE = re.compile(r"epoch-\d+\.keras")
FORMAT_VERSION = 1


def partial_dir(out: Path) -> Path:
    """Where the in-progress state of a run writing `out` lives."""
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for this process; the operating system drops it if we
    die. The lock file `.OUT.lock` names its holder's pid, and is removed on release (filelock
    sees a removed file and locks the new one)."""
    import filelock

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_name(f".{out.name}.lock")
    held = filelock.FileLock(path, timeout=0)
    try:
        held.acquire()
    except filelock.Timeout:
        try:
            owner = path.read_text().strip() or "another process"
        except OSError:
            owner = "another process"
        raise CnnmnistError(
            f"{out}: another `cnnmnist train` (pid {owner}) is writing here; "
            "wait for it to finish or choose another --out"
        ) from None
    try:
        path.write_text(str(os.getpid()))  # the lock is advisory: this handle may write
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        held.release()


def seed_states(model) -> list:
    """The dropout RNG states, which Keras does not save with the model."""
    return [v for v in model.non_trainable_variables if "seed_generator" in v.path]


def save(
    model,
    out: Path,
    epoch: int,
    history: list[dict[str, Any]],
    recipe: Preset,
    options: dict[str, Any],
) -> None:
    """Record the end of `epoch` (1-based count of completed epochs), atomically."""
    directory = partial_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    weights = f"epoch-{epoch}.keras"
    model.save(directory / weights)
    state = {
        "format_version": FORMAT_VERSION,
        "epoch": epoch,
        "model": weights,
        "seed_states": [v.numpy().tolist() for v in seed_states(model)],
        "history": history,
        "recipe": asdict(recipe),
        "options": options,
    }
    tmp = directory / f"{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE)  # the switch to the new epoch is this one rename
    for old in directory.glob("epoch-*.keras"):
        if old.name != weights:
            old.unlink()


def load_state(out: Path) -> dict[str, Any] | None:
    """The recorded state of an interrupted run writing `out`, or None if there is none."""
    path = partial_dir(out) / STATE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CnnmnistError(f"{path}: corrupted resume state ({e}); delete {path.parent}") from None
    bad = schema.mismatch(state, schema.STATE)
    if not bad and not MODEL_FILE.fullmatch(state["model"]):
        bad = "model"  # a file name inside OUT.partial/, never a path elsewhere
    if bad:
        raise CnnmnistError(f"{path}: corrupted resume state: {bad}; delete {path.parent}")
    if state["format_version"] > FORMAT_VERSION:
        raise CnnmnistError(f"{path}: written by a newer cnnmnist")
    try:
        Preset(**state["recipe"]).validate()
    except (TypeError, UsageError) as e:
        raise CnnmnistError(
            f"{path}: corrupted resume state: recipe ({e}); delete {path.parent}"
        ) from None
    if state["options"]["dataset"] not in DATASETS:
        raise CnnmnistError(f"{path}: corrupted resume state: options.dataset")
    return state


def restore(out: Path, state: dict[str, Any]):
    """The model (weights, optimizer, dropout RNG) as it was at the end of the recorded epoch."""
    from cnnmnist.model import load

    path = partial_dir(out) / state["model"]
    try:
        model = load(path)
    except Exception as e:  # noqa: BLE001 - Keras raises many kinds for a damaged file
        raise CnnmnistError(f"{path}: cannot load the saved training state: {e}") from None
    variables = seed_states(model)
    if len(variables) != len(state["seed_states"]):
        raise CnnmnistError(
            f"{partial_dir(out) / STATE}: corrupted resume state: seed_states (the model has "
            f"{len(variables)} random generators, the state {len(state['seed_states'])})"
        )
    try:
        for variable, value in zip(variables, state["seed_states"], strict=True):
            variable.assign(value)
    except Exception as e:  # noqa: BLE001 - TensorFlow or Keras: a shape or dtype mismatch
        raise CnnmnistError(
            f"{partial_dir(out) / STATE}: corrupted resume state: seed_states ({e})"
        ) from None
    return model


def discard(out: Path) -> None:
    """Remove the in-progress state once the final checkpoint is in place."""
    shutil.rmtree(partial_dir(out), ignore_errors=True)
