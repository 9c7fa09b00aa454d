"""The checkpoint directory: its files, its metadata's schema, what may be replaced, and
reading it back, checked (stdlib only; `export` writes it)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnmnist import files, schema
from cnnmnist.errors import CheckpointError, CnnmnistError

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


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# What a checkpoint directory holds: `--force` replaces a directory only if everything in it
# is of these (and its metadata is cnnmnist's), or it is empty. Never remove what this tool
# did not write.
CONTENTS = frozenset(
    {"saved_model.pb", "fingerprint.pb", "variables", "assets", KERAS_MODEL, METADATA, TFLITE}
)
VARIABLES = re.compile(r"variables\.(index|data-\d+-of-\d+)")


def strangers(path: Path) -> list[str]:
    """What in the directory `path` this tool does not write into a checkpoint (links and
    other kinds of file included), as paths relative to it."""
    found = []
    for entry in sorted(path.iterdir()):
        ours = entry.name in CONTENTS and not entry.is_symlink()
        if ours and entry.name == "variables":
            ours = entry.is_dir() and all(
                VARIABLES.fullmatch(p.name) and p.is_file() and not p.is_symlink()
                for p in entry.iterdir()
            )
        elif ours and entry.name == "assets":
            ours = entry.is_dir() and not any(entry.iterdir())  # exports write it empty
        elif ours:
            ours = entry.is_file()
        if not ours:
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def check_replaceable(out: Path) -> None:
    """Raise unless `out` is absent, an empty directory, or wholly a cnnmnist checkpoint:
    nothing in it that this tool does not write, and metadata that is this tool's."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise CheckpointError(
            f"{out}: is {kind}, not a checkpoint directory; refusing to replace it"
        )
    if not any(out.iterdir()):
        return
    others = strangers(out)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise CheckpointError(
            f"{out}: not a cnnmnist checkpoint (it holds {shown}); --force replaces only "
            "checkpoints. Choose another --out"
        )
    try:
        _metadata(out)
    except CheckpointError as e:
        raise CheckpointError(
            f"{out}: not a cnnmnist checkpoint ({str(e).removeprefix(str(out / METADATA) + ': ')}"
            "); --force replaces only checkpoints. Choose another --out"
        ) from None


@dataclass
class Checkpoint:
    """A checkpoint directory whose files and metadata have been checked."""

    path: Path
    metadata: dict[str, Any]


def read(path: Path) -> Checkpoint:
    """Open a checkpoint directory, checking its files and metadata (not loading TensorFlow)."""
    path = Path(path)
    if not path.exists():
        files.recover(path, tidy=False)  # a writer killed between its two renames
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
    return Checkpoint(path, _metadata(path))


def _metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata, read with a bound and checked against its schema."""
    try:
        metadata = files.read_json(path / METADATA, "metadata")
    except CnnmnistError as e:
        raise CheckpointError(str(e)) from None
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
    return metadata
