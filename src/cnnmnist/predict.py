"""`predict`: inputs (files, folders, stdin) -> prepared 28x28 digits -> the checkpoint's
probabilities -> one result per input (no TensorFlow on the fast path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import checkpoint, runners
from cnnmnist.preprocess import (
    FORMAT_NAMES,
    STDIN,
    ImageError,
    Prepared,
    has_ink,
    image_files,
    prepare,
)

LOW_CONFIDENCE = 0.5


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files stay, folders become the image files in them (`image_files`: subfolders
    included, hidden ones not), '-' means stdin."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if item != STDIN and path.is_dir():
            out.extend(str(p) for p in image_files(path)[0])
        else:
            out.append(item)
    return out


def predict(
    inputs: list[str],
    model_dir: Path,
    top_k: int = 3,
    stdin: bytes | None = None,
    on_warning=lambda warning: None,
) -> list[dict[str, Any]]:
    """Predict every input in one batched model call; one result per input, in input order.
    Warnings about the model (not one image) go to on_warning."""
    sources = expand_inputs(inputs)
    if not sources:
        raise ImageError(
            f"no images found in {', '.join(inputs)} "
            f"(looked for {FORMAT_NAMES} files, in subfolders too)"
        )
    model = runners.load(checkpoint.read(model_dir), on_warning)  # fails before decoding
    prepared = [prepare(source, stdin if source == STDIN else None) for source in sources]
    ready = [p for p in prepared if has_ink(p)]
    probs = model.probabilities(np.stack([p.pixels for p in ready])) if ready else np.zeros((0, 10))
    by_id = {id(p): row for p, row in zip(ready, probs, strict=True)}
    return [result(p, by_id.get(id(p)), model.name, top_k) for p in prepared]


def result(prepared: Prepared, row: np.ndarray | None, engine: str, top_k: int = 3):
    """One input's answer, as `predict --json` prints it (plus the pixels the model saw), from
    its preprocessing and its probabilities (None: nothing to predict)."""
    out: dict[str, Any] = {
        "file": "<stdin>" if prepared.source == STDIN else prepared.source,
        "digit": None,
        "confidence": None,
        "probabilities": None,
        "top": [],
        "warnings": list(prepared.warnings),
        "error": prepared.error,
        "engine": engine,
        "pixels": prepared.pixels,  # what the model saw (for --show; not part of --json)
    }
    if row is not None:
        order = np.argsort(-row, kind="stable")
        out.update(
            digit=int(order[0]),
            confidence=float(row[order[0]]),
            probabilities=[float(v) for v in row],
            top=[{"digit": int(k), "probability": float(row[k])} for k in order[:top_k]],
        )
        if row[order[0]] < LOW_CONFIDENCE:
            out["warnings"].append(f"low confidence ({row[order[0]]:.0%})")
    return out
