"""The shape of the JSON files this tool reads back (checkpoint metadata, resume state).

A file edited by hand or damaged on disk must be reported as "corrupted ...: FIELD", never
crash later as an AttributeError deep inside. Stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Maybe:
    """The field may be missing or null."""

    spec: Any


@dataclass(frozen=True)
class ListOf:
    """A list whose every item matches spec."""

    spec: Any


@dataclass(frozen=True)
class Number:
    """A finite int or float (never a bool) in [low, high]."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False


def mismatch(value: Any, spec: Any, where: str = "") -> str | None:
    """The dotted path of the first field of `value` that does not match `spec`, or None.

    spec: a type (str, dict, list, bool), a Number, ListOf, Maybe, or a dict of field
    name -> spec (fields not named are allowed; named ones are required unless Maybe).
    """
    if isinstance(spec, Maybe):
        return None if value is None else mismatch(value, spec.spec, where)
    if isinstance(spec, Number):
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (not spec.integer or isinstance(value, int))
            and math.isfinite(value)
            and spec.low <= value <= spec.high
        )
        return None if ok else where or "value"
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            return where or "value"
        for i, item in enumerate(value):
            bad = mismatch(item, spec.spec, f"{where}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return where or "value"
        for key, field_spec in spec.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                if isinstance(field_spec, Maybe):
                    continue
                return path
            bad = mismatch(value[key], field_spec, path)
            if bad:
                return bad
        return None
    ok = isinstance(value, spec) and not (spec is not bool and isinstance(value, bool))
    return None if ok else where or "value"


COUNT = Number(0, math.inf, integer=True)
PROBABILITY = Number(0.0, 1.0)
HISTORY = ListOf({"epoch": COUNT, "loss": Maybe(Number()), "accuracy": Maybe(PROBABILITY)})

# cnnmnist.json: the fields that `evaluate`, `predict` and `inspect` rely on.
METADATA = {
    "format_version": Number(1, math.inf, integer=True),
    "preset": str,
    "hyperparameters": Maybe(dict),
    "dataset": {
        "name": str,
        "validation_size": COUNT,
        "train_size": Maybe(COUNT),
        "test_size": Maybe(COUNT),
    },
    "history": HISTORY,
    "test": Maybe({"accuracy": PROBABILITY, "loss": Number(), "n": COUNT}),
    "reference_accuracy": Maybe(PROBABILITY),
    "versions": Maybe(dict),
    "fast_path": Maybe({"file": Maybe(str), "sha256": Maybe(str)}),
    "warnings": Maybe(ListOf(str)),
}

# OUT.partial/state.json: what --resume needs.
STATE = {
    "format_version": Number(1, math.inf, integer=True),
    "epoch": COUNT,
    "model": str,
    "seed_states": ListOf(ListOf(Number(integer=True))),
    "history": HISTORY,
    "recipe": dict,
    "options": {"dataset": str, "data_dir": Maybe(str)},
}
