"""Writing and reading the checkpoint directory (SavedModel, Keras model, metadata) atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnmnist import schema
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
        return {"file": TFLITE, "sha256": file_sha256(saved_model / TFLITE), "checked_on": 0}
    from cnnmnist import serving

    pixels = np.asarray(check_images[:TFLITE_CHECK_IMAGES], np.float32).reshape(-1, 28, 28, 1)
    reference = serving.SavedModel(saved_model).probabilities(pixels)
    fast = serving.TFLite(saved_model / TFLITE).probabilities(pixels)
    agreement = float((fast.argmax(axis=1) == reference.argmax(axis=1)).mean())
    difference = float(np.abs(fast - reference).max())
    report = {
        "file": TFLITE,
        "sha256": file_sha256(saved_model / TFLITE),  # `predict` verifies the copy against it
        "checked_on": len(pixels),
        "argmax_agreement": agreement,
        "max_abs_diff": difference,
    }
    if agreement < 1.0 or difference > TFLITE_TOLERANCE:
        (saved_model / TFLITE).unlink()
        report.update(file=None, reason="the TFLite copy disagreed with the SavedModel")
    return report


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# What a checkpoint directory holds: `--force` replaces a directory only if it holds nothing
# else (and its metadata file), or nothing at all. Never remove what this tool did not write.
CONTENTS = frozenset(
    {"saved_model.pb", "fingerprint.pb", "variables", "assets", KERAS_MODEL, METADATA, TFLITE}
)


def check_replaceable(out: Path) -> None:
    """Raise unless `out` is absent, an empty directory, or recognisably a cnnmnist checkpoint."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise CheckpointError(
            f"{out}: is {kind}, not a checkpoint directory; refusing to replace it"
        )
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    strangers = sorted(names - CONTENTS)
    if strangers or METADATA not in names:
        shown = ", ".join(strangers[:5]) + (", ..." if len(strangers) > 5 else "")
        what = f"it holds {shown}" if strangers else f"it has no {METADATA}"
        raise CheckpointError(
            f"{out}: not a cnnmnist checkpoint ({what}); --force replaces only checkpoints. "
            "Choose another --out"
        )


def _temporaries(out: Path, kind: str) -> list[tuple[Path, int]]:
    """This tool's temporaries beside `out`, `.OUT.KIND-PID-SUFFIX`, with the writer's pid
    (names compared literally: a `*` in --out is a character, not a pattern)."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{out.name}.{kind}-") + r"(\d+)-[A-Za-z0-9_]+")
    found = [(p, pattern.fullmatch(p.name)) for p in out.parent.iterdir()]
    return sorted((p, int(m.group(1))) for p, m in found if m)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (signal 0 probes it on POSIX). On Windows os.kill(pid, 0)
    would end the process, so every writer counts as alive there: its leftovers stay."""
    if os.name == "nt":
        return True
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
        for path, pid in _temporaries(out, kind):
            if pid != os.getpid() and _alive(pid):
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
    check_replaceable(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the checkpoint from others
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


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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

    def predict(self, pixels, batch_size: int = 1000):
        """Class probabilities [N, 10] of raw pixels [N, 28, 28(, 1)] via the SavedModel."""
        from cnnmnist import serving

        return serving.SavedModel(self.path).probabilities(pixels, batch_size)


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / METADATA}: corrupted metadata ({e})") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if schema.mismatch(version, schema.METADATA["format_version"]) is None:
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format version {version} is newer than this cnnmnist "
                f"reads ({FORMAT_VERSION}); upgrade cnnmnist to use it"
            )
    bad = schema.mismatch(metadata, schema.METADATA)
    if bad:
        raise CheckpointError(f"{path / METADATA}: corrupted metadata: {bad}")
    return Checkpoint(path, metadata)
