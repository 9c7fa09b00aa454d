"""Writing and reading the checkpoint directory (SavedModel, Keras model, metadata) atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnmnist.errors import CheckpointError

if TYPE_CHECKING:
    import keras

FORMAT_VERSION = 1
METADATA = "cnnmnist.json"
KERAS_MODEL = "model.keras"
TFLITE = "model.tflite"  # optional fast copy for `predict`; the SavedModel is the authority
TFLITE_TOLERANCE = 1e-4  # largest probability difference accepted from the fast copy
# Images on which the fast copy must match the SavedModel: a faulty conversion is wrong on
# most images, not on one in ten thousand, and the full test set costs seconds per run.
TFLITE_CHECK_IMAGES = 1000
SIGNATURE = "serving_default"
REQUIRED = ("saved_model.pb", "variables/variables.index", KERAS_MODEL, METADATA)


def export_saved_model(model: keras.Model, path: Path) -> None:
    """Write the SavedModel: serving_default maps raw pixels [N,28,28,1] to probabilities."""
    import keras
    import tensorflow as tf

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


def write_tflite(saved_model: Path, check_images=None) -> dict[str, Any]:
    """Convert the SavedModel to TFLite beside it, kept only if it predicts like the SavedModel.

    Returns what was done, for the metadata.
    """
    import numpy as np
    import tensorflow as tf

    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), [SIGNATURE])
        (saved_model / TFLITE).write_bytes(converter.convert())
    except Exception as e:  # noqa: BLE001 - any converter failure only costs the fast path
        return {"file": None, "reason": f"conversion failed: {type(e).__name__}: {e}"[:300]}
    if check_images is None or len(check_images) == 0:
        return {"file": TFLITE, "checked_on": 0}
    pixels = np.asarray(check_images[:TFLITE_CHECK_IMAGES], np.float32).reshape(-1, 28, 28, 1)
    reference = Checkpoint(saved_model, {}).predict(pixels)
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter  # noqa: N806 - same API, deprecated in TF
    runner = Interpreter(model_path=str(saved_model / TFLITE), num_threads=os.cpu_count())
    fast = tflite_probabilities(runner.get_signature_runner(SIGNATURE), pixels)
    agreement = float((fast.argmax(axis=1) == reference.argmax(axis=1)).mean())
    difference = float(np.abs(fast - reference).max())
    report = {
        "file": TFLITE,
        "checked_on": len(pixels),
        "argmax_agreement": agreement,
        "max_abs_diff": difference,
    }
    if agreement < 1.0 or difference > TFLITE_TOLERANCE:
        (saved_model / TFLITE).unlink()
        report.update(file=None, reason="the TFLite copy disagreed with the SavedModel")
    return report


def tflite_probabilities(runner, pixels, batch_size: int = 1000):
    """Probabilities from a TFLite signature runner, in batches: one call on 10,000 images
    would hold a gigabyte of first-layer activations."""
    import numpy as np

    pixels = np.asarray(pixels, np.float32).reshape(-1, 28, 28, 1)
    outs = [
        runner(pixels=pixels[i : i + batch_size])["probabilities"]
        for i in range(0, len(pixels), batch_size)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, 10), np.float32)


def _temporaries(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> None:
    """Undo what a crashed write left: restore a moved-away checkpoint, drop stale temporaries."""
    for kind in ("tmp", "old"):
        for path in _temporaries(out, kind):
            pid = path.name.rsplit("-", 2)[-2]
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                continue  # another run is writing right now
            if kind == "old" and not out.exists():
                os.rename(path, out)  # crash between the two renames: the old one is still good
            else:
                shutil.rmtree(path, ignore_errors=True)


def write(
    model: keras.Model,
    out: Path,
    metadata: dict[str, Any],
    *,
    overwrite: bool,
    check_images=None,
    served: keras.Model | None = None,
) -> Path:
    """Write a complete checkpoint beside `out`, then swap it in by rename.

    model is saved with its optimizer (to continue training); served (default: model) is
    exported as the SavedModel. check_images: raw test pixels on which the fast TFLite
    copy must match the SavedModel.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from other users
    moved = None
    try:
        export_saved_model(served or model, tmp)
        fast_path = write_tflite(tmp, check_images)
        model.save(tmp / KERAS_MODEL)
        meta = {"format_version": FORMAT_VERSION, **metadata, "fast_path": fast_path}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        if out.exists():
            # Two renames: a crash between them leaves the old checkpoint under a name that
            # recover() puts back; a failure here puts it back at once.
            moved = out.parent / f".{out.name}.old-{os.getpid()}-0"
            os.rename(out, moved)
        os.rename(tmp, out)
    except BaseException:
        if moved is not None and not out.exists():
            os.rename(moved, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if moved is not None:
        shutil.rmtree(moved, ignore_errors=True)
    return out


def _fsync_tree(root: Path) -> None:
    """Flush every file to disk so the rename never publishes half-written content."""
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Checkpoint:
    """A checkpoint directory whose files and metadata have been checked."""

    path: Path
    metadata: dict[str, Any]

    def signature(self):
        """The SavedModel's serving_default concrete function (imports TensorFlow)."""
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(str(self.path))
            fn = loaded.signatures[SIGNATURE]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: SavedModel has no {SIGNATURE!r} signature"
            ) from None
        except Exception as e:  # noqa: BLE001 - TF raises many kinds for a damaged SavedModel
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{self.path}: the SavedModel cannot be loaded: {first}"
            ) from None
        fn._cnnmnist_owner = loaded  # keep the variables alive as long as the function
        return fn

    def predict(self, pixels, batch_size: int = 1000):
        """Class probabilities [N, 10] of raw pixels [N, 28, 28(, 1)] via the signature."""
        import numpy as np
        import tensorflow as tf

        fn = self.signature()
        pixels = np.asarray(pixels, dtype=np.float32).reshape(-1, 28, 28, 1)
        outs = [
            fn(pixels=tf.constant(pixels[i : i + batch_size]))["probabilities"].numpy()
            for i in range(0, len(pixels), batch_size)
        ]
        return np.concatenate(outs) if outs else np.zeros((0, 10), np.float32)


def read(path: Path) -> Checkpoint:
    """Open a checkpoint directory, checking its files and metadata (not loading TensorFlow)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (it is a file)")
    if not (path / METADATA).exists() and not (path / "saved_model.pb").exists():
        raise CheckpointError(
            f"{path}: not a cnnmnist checkpoint (no {METADATA} or saved_model.pb); "
            "create one with `cnnmnist train --out DIR`"
        )
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if not any((path / "variables").glob("variables.data-*")):
        missing.append("variables/variables.data-*")
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        metadata = json.loads((path / METADATA).read_text())
        version = metadata["format_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / METADATA}: corrupted metadata ({e})") from None
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path / METADATA}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this cnnmnist reads "
            f"({FORMAT_VERSION}); upgrade cnnmnist to use it"
        )
    return Checkpoint(path, metadata)
