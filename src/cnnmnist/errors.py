"""The project's own exceptions, and other libraries' failures told as one line; only
cli.py turns them into exit codes."""

import re
import sys


class CnnmnistError(Exception):
    """A failure the user can act on; the message says what and where (exit 1)."""


class UsageError(CnnmnistError):
    """The user asked for something that does not exist (exit 2)."""


class DataError(CnnmnistError):
    """A dataset file is missing, malformed or does not match its checksum."""


class CheckpointError(CnnmnistError):
    """A checkpoint directory is missing, incomplete, corrupted or of an unknown format."""


class Interrupted(CnnmnistError):
    """The user stopped a run (Ctrl-C); the message says how to resume (exit 130)."""


# The lines of a TensorFlow error message that are not the message: where the op was made.
_BOILERPLATE = re.compile(r"(Graph execution error|Detected at node|File \"|\[\[)")


def tf_failure(error: BaseException, doing: str) -> str | None:
    """A TensorFlow runtime error (out of memory, a kernel that refuses, ...) as one line:
    'DOING failed: KIND: the message'; None if `error` is not TensorFlow's. TensorFlow is
    not imported here: an error can only be its own if it is loaded already."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(error, tf.errors.OpError):
        return None
    lines = [line.strip() for line in str(error).splitlines()]
    message = next((line for line in lines if line and not _BOILERPLATE.match(line)), "")
    return f"{doing} failed: {type(error).__name__}: {message}"


def os_error(e: OSError) -> str:
    """'PATH: what happened' for an OS-level failure (both paths of a rename)."""
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    if getattr(e, "filename2", None) is not None:
        return f"{e.filename} -> {e.filename2}: {what}"
    return f"{e.filename}: {what}"
