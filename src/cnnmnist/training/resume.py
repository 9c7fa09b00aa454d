"""The state of a run in progress, saved after every epoch beside the checkpoint it writes.

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import keras

import cnnmnist.model  # noqa: F401 - registers the Keras classes model.keras names
from cnnmnist import files, schema
from cnnmnist.errors import CnnmnistError, UsageError
from cnnmnist.presets import DATASETS, Preset

STATE = "state.json"
MODEL_FILE = re.compile(r"epoch-\d+\.keras")
FORMAT_VERSION = 1


def partial_dir(out: Path) -> Path:
    """Where the in-progress state of a run writing `out` lives."""
    return out.with_name(out.name + ".partial")


def check_partial(out: Path) -> None:
    """Refuse an `OUT.partial` that is not a run's state as this tool writes it (a user's own
    folder of that name, or one holding links): training would write into it and, at the
    end, delete it."""
    partial = partial_dir(out)
    if not partial.exists() and not partial.is_symlink():
        return
    if partial.is_symlink() or not partial.is_dir():
        raise CnnmnistError(
            f"{partial}: is not a folder this tool made (a link or a file); cnnmnist keeps "
            f"the state of a run writing {out} there: move it away, or choose another --out"
        )
    others = [
        p.name
        for p in sorted(partial.iterdir())
        if p.is_symlink()
        or not p.is_file()
        or not (p.name in (STATE, STATE + ".tmp") or MODEL_FILE.fullmatch(p.name))
    ]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise CnnmnistError(
            f"{partial}: not an interrupted cnnmnist run (it holds {shown}); cnnmnist keeps "
            f"the state of a run writing {out} there: move it away, or choose another --out"
        )


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
    path = directory / weights
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # never written through: a link planted there would lead elsewhere
    try:
        model.save(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a full disk leaves no half-written file filling it further
        raise
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
    files.write_new(tmp, json.dumps(state, indent=1).encode())
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
        state = files.read_json(path, "resume state")
    except CnnmnistError as e:
        raise CnnmnistError(f"{e}; delete {path.parent}") from None
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
    path = partial_dir(out) / state["model"]
    try:
        model = keras.saving.load_model(path)
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
