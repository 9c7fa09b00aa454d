"""Writing a checkpoint: the trained network exported as a SavedModel, its TFLite copy kept
only if it answers as the SavedModel does, the Keras model and the metadata, all built in a
temporary directory and swapped in whole."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cnnmnist import files, runners
from cnnmnist.checkpoint import (
    FORMAT_VERSION,
    KERAS_MODEL,
    METADATA,
    SIGNATURE,
    TFLITE,
    check_replaceable,
    file_sha256,
)
from cnnmnist.errors import CheckpointError

TFLITE_TOLERANCE = 1e-4  # largest probability difference accepted from the fast copy
# Images on which the fast copy must match the SavedModel: a faulty conversion is wrong on
# most images, not on one in ten thousand, and the full test set costs seconds per run.
TFLITE_CHECK_IMAGES = 1000


def saved_model(model: keras.Model, path: Path) -> None:
    """Write the SavedModel: serving_default maps raw pixels [N,28,28,1] to probabilities."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(pixels):
        # Softmax in float32 whatever policy the model computed in.
        return {"probabilities": tf.nn.softmax(tf.cast(model(pixels, training=False), tf.float32))}

    archive.add_endpoint(
        name=SIGNATURE,
        fn=serve,
        input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="pixels")],
    )
    archive.write_out(str(path), verbose=False)


def tflite(directory: Path, check_images=None) -> dict[str, Any]:
    """Convert the SavedModel in `directory` to TFLite beside it, kept only if it predicts
    like the SavedModel on `check_images`. Returns what was done, for the metadata."""
    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(directory), [SIGNATURE])
        (directory / TFLITE).write_bytes(converter.convert())
    except Exception as e:  # noqa: BLE001 - any converter failure only costs the fast path
        return {"file": None, "reason": f"conversion failed: {type(e).__name__}: {e}"[:300]}
    if check_images is None or len(check_images) == 0:
        return {"file": TFLITE, "sha256": file_sha256(directory / TFLITE), "checked_on": 0}
    pixels = np.asarray(check_images[:TFLITE_CHECK_IMAGES], np.float32).reshape(-1, 28, 28, 1)
    reference = runners.SavedModel(directory).probabilities(pixels)
    fast = runners.TFLite(directory / TFLITE).probabilities(pixels)
    agreement = float((fast.argmax(axis=1) == reference.argmax(axis=1)).mean())
    difference = float(np.abs(fast - reference).max())
    report = {
        "file": TFLITE,
        "sha256": file_sha256(directory / TFLITE),  # runners.load checks the copy against it
        "checked_on": len(pixels),
        "argmax_agreement": agreement,
        "max_abs_diff": difference,
    }
    if agreement < 1.0 or difference > TFLITE_TOLERANCE:
        (directory / TFLITE).unlink()
        report.update(file=None, reason="the TFLite copy disagreed with the SavedModel")
    return report


def write(
    model: keras.Model,
    out: Path,
    metadata: dict[str, Any],
    *,
    overwrite: bool,
    check_images=None,
    served: keras.Model | None = None,
    step: Callable[[str], contextlib.AbstractContextManager] = lambda what: (
        contextlib.nullcontext()
    ),
) -> Path:
    """Write a complete checkpoint beside `out`, then swap it in whole.

    `model` is saved with its optimizer (to continue training); `served` (default: model)
    is exported as the SavedModel. check_images: raw test pixels on which the fast TFLite
    copy must match the SavedModel. `step(what)` wraps each step (to tell the user).
    """
    out = Path(out)
    files.check_name(out)
    created = files.make_dirs(out.parent)
    files.recover(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    check_replaceable(out)
    tmp = files.temporary_dir(out)
    try:
        with step("exporting the SavedModel"):
            saved_model(served or model, tmp)
        with step("converting it to TFLite and checking the copy against it"):
            fast_path = tflite(tmp, check_images)
        with step(f"writing the checkpoint {out}"):
            model.save(tmp / KERAS_MODEL)
            meta = {"format_version": FORMAT_VERSION, **metadata, "fast_path": fast_path}
            (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
            files.fsync_tree(tmp)
            files.swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        files.remove_empty(created)
        raise
    return out
