"""Running a checkpoint on 28x28 pixels: its TFLite copy (LiteRT, no TensorFlow) when that is
the one recorded and it loads, else its SavedModel signature; in batches. `predict`,
`evaluate`, `explain`, `serve` and the export's cross-check all run models here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from cnnmnist.checkpoint import SIGNATURE, TFLITE, Checkpoint, file_sha256
from cnnmnist.errors import CheckpointError

BATCH = 1000  # images per call: one call on 10,000 images would hold ~1 GB of activations


class Runner(Protocol):
    """A way to run a checkpoint: `name` ("tflite" or "savedmodel") and its probabilities."""

    name: str

    def probabilities(self, pixels, batch_size: int = BATCH) -> np.ndarray: ...


def batched(call: Callable[[np.ndarray], np.ndarray], pixels, batch_size: int = BATCH):
    """Probabilities [N, 10] of raw pixels [N, 28, 28(, 1)], `batch_size` images per call."""
    pixels = np.asarray(pixels, dtype=np.float32).reshape(-1, 28, 28, 1)
    outs = [call(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 10), np.float32)


class SavedModel:
    """The SavedModel's serving_default signature (imports TensorFlow)."""

    name = "savedmodel"

    def __init__(self, path: Path) -> None:
        import tensorflow as tf

        try:
            self._loaded = tf.saved_model.load(str(path))  # keeps the variables alive
            self._fn = self._loaded.signatures[SIGNATURE]
        except KeyError:
            raise CheckpointError(f"{path}: SavedModel has no {SIGNATURE!r} signature") from None
        except Exception as e:  # noqa: BLE001 - TF raises many kinds for a damaged SavedModel
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: the SavedModel cannot be loaded: {first}") from None

    def probabilities(self, pixels, batch_size: int = BATCH) -> np.ndarray:
        """Class probabilities [N, 10] of raw 0..255 pixels [N, 28, 28(, 1)]."""
        import tensorflow as tf

        call = lambda x: self._fn(pixels=tf.constant(x))["probabilities"].numpy()  # noqa: E731
        return batched(call, pixels, batch_size)


class TFLite:
    """A TFLite copy of the signature, run by LiteRT (no TensorFlow import)."""

    name = "tflite"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self._runner = interpreter(path, threads).get_signature_runner(SIGNATURE)

    def probabilities(self, pixels, batch_size: int = BATCH) -> np.ndarray:
        """Class probabilities [N, 10] of raw 0..255 pixels [N, 28, 28(, 1)]."""
        return batched(lambda x: self._runner(pixels=x)["probabilities"], pixels, batch_size)


def interpreter(path: Path, threads: int | None = None, preserve: bool = False):
    """A TFLite interpreter for the file: LiteRT's, or TensorFlow's where LiteRT is missing.
    `preserve`: keep every intermediate tensor readable (the feature maps of `explain`)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806 - same API, deprecated in TF
    return Interpreter(
        model_path=str(path),
        num_threads=threads or os.cpu_count(),
        experimental_preserve_all_tensors=preserve,
    )


def load(
    ckpt: Checkpoint, warn: Callable[[str], None] = lambda message: None, fast: bool = True
) -> Runner:
    """The fastest trustworthy way to run `ckpt`: with `fast`, its TFLite copy when the
    metadata records that file and its checksum, the file matches it, and it loads; the
    SavedModel (the authority) otherwise."""
    copy = ckpt.path / TFLITE
    if not fast or not copy.is_file():
        return SavedModel(ckpt.path)
    recorded = ckpt.metadata.get("fast_path") or {}
    if recorded.get("file") != TFLITE or not recorded.get("sha256"):
        warn(
            f"{copy}: the checkpoint's metadata does not record it (it was not written with "
            "this checkpoint); using the SavedModel instead"
        )
    elif file_sha256(copy) != recorded["sha256"]:
        warn(
            f"{copy}: does not match the checksum recorded when it was written (damaged "
            "or replaced); using the SavedModel instead"
        )
    else:
        try:
            return TFLite(copy)
        except (ValueError, RuntimeError):
            warn(f"{copy}: cannot be loaded; using the SavedModel instead")
    return SavedModel(ckpt.path)
