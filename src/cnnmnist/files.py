"""The one place that writes what a user sees on disk: a file written whole or not at all, a
directory swapped in whole, what a crash left undone, bounded reads of the JSON this tool
wrote, and the checks that refuse an output path before any work is done (stdlib only)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cnnmnist.errors import CnnmnistError, UsageError

# The JSON files this tool writes are small (a checkpoint's metadata, a run's state): one
# far larger was not written by it, and reading it whole could take gigabytes.
MAX_JSON = 16 * 2**20
# The longest name written beside OUT is `.OUT.tmp-PID-XXXXXXXX`: OUT's name plus this much.
NAME_OVERHEAD = 24


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it into place: a
    reader never sees half a file, and a failure leaves what was there."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask())  # as open() makes it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_new(path: Path, data: bytes) -> None:
    """Write `data` to `path`, durably, never through a symbolic link or into another file:
    whatever was at `path` (a file, or a link planted there) is removed first."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path, what: str, limit: int = MAX_JSON) -> Any:
    """The JSON value in `path`, read with a bound: a file larger than `limit`, not UTF-8,
    not JSON or nested beyond Python's recursion limit is an error naming it as `what`."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CnnmnistError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise CnnmnistError(f"{path}: corrupted {what} (larger than {limit >> 20} MiB)")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CnnmnistError(f"{path}: corrupted {what} ({e})") from None
    except RecursionError:
        raise CnnmnistError(f"{path}: corrupted {what} (nested too deeply)") from None


def fsync_tree(root: Path) -> None:
    """Flush every file to disk so a rename never publishes half-written content."""
    for path in [*Path(root).rglob("*"), Path(root)]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dirs(path: Path) -> list[Path]:
    """Create `path` and its missing parents; returns those created, deepest first, so a
    failed step can remove exactly them (`remove_empty`)."""
    path, created = Path(path), []
    while not path.exists():
        created.append(path)
        path = path.parent
    for directory in reversed(created):
        directory.mkdir()
    return created


def remove_empty(directories: list[Path]) -> None:
    """Remove the directories `make_dirs` created, as far as they are still empty."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


# --- a directory replaced whole -----------------------------------------------------------


def temporary_dir(out: Path) -> Path:
    """A new directory beside `out` to build its replacement in (`.OUT.tmp-PID-...`),
    readable as a directory made by mkdir would be."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide it from others
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 RENAME_EXCHANGE); False where the
    system or the file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def swap_in(tmp: Path, out: Path) -> None:
    """Put the complete directory `tmp` at `out`, replacing what is there, so that `out`
    always holds the old directory or the new one, never neither and never half of one.

    Where the file system swaps two names in one step, it does; the old directory (now at
    `tmp`) is then removed. Elsewhere, two renames: the old one moves aside to
    `.OUT.old-PID-0` first, and a crash between the renames leaves it there, where `recover`
    (run by every reader of `out`) puts it back."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    moved = out.parent / f".{out.name}.old-{os.getpid()}-0"
    os.rename(out, moved)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(moved, out)
        raise
    shutil.rmtree(moved, ignore_errors=True)


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


def recover(out: Path, tidy: bool = True) -> None:
    """Undo what a crashed write left beside `out`: a directory moved aside and not yet
    replaced is put back. With `tidy`, the dead writers' temporaries are removed too."""
    out = Path(out)
    for kind in ("old", "tmp") if tidy else ("old",):
        for path, pid in _temporaries(out, kind):
            if pid != os.getpid() and _alive(pid):
                continue  # another run is writing right now
            if kind == "old" and not out.exists():
                os.rename(path, out)  # crash between the two renames: the old one is good
            elif tidy:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for this process; the operating system drops it if we
    die. The lock file `.OUT.lock` names its holder's pid, and is removed on release
    (filelock sees a removed file and locks the new one)."""
    import filelock

    path = out.with_name(f".{out.name}.lock")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CnnmnistError(
            f"{path}: is not a lock file this tool made (a link or a folder); remove it"
        )
    held = filelock.FileLock(path, timeout=0)
    try:
        held.acquire()
    except filelock.Timeout:
        try:
            owner = path.read_text().strip()[:20] or "another process"
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


def check_name(out: Path) -> None:
    """Refuse an output directory whose name leaves no room for the temporary names written
    beside it, before any work (the file system would refuse them only at the end)."""
    parent = out.parent if out.parent.exists() else Path(".")
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(os.fsencode(out.name))
    if size + NAME_OVERHEAD > limit:
        raise UsageError(
            f"{out}: its name is {size} bytes long; the file system allows {limit}, and "
            f"cnnmnist needs {NAME_OVERHEAD} more for the temporary names it writes beside "
            "it. Choose a shorter name"
        )


# --- output files (pictures) --------------------------------------------------------------

# How each picture format this tool writes begins, to recognise a file it may replace.
SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "pdf": (b"%PDF",), "svg": (b"<?xml", b"<svg")}


def output_file(path: Path, formats: tuple[str, ...], option: str) -> str:
    """Check, before any work, that a picture may be written at `path`; returns its format
    (from the suffix). Refused: a suffix not in `formats` (a usage error), a parent folder
    that does not exist (nothing is created), a file inside a checkpoint directory, and an
    existing file that is not a picture of that format (a user's document, a checkpoint's
    own file). An existing picture of the format is replaced."""
    path = Path(path)
    kind = path.suffix.lower().removeprefix(".")
    if kind not in formats:
        named = ", ".join(f".{f}" for f in formats)
        raise UsageError(
            f"{option} {path}: cannot write {path.suffix or 'a file without a suffix'}; "
            f"give a name ending in {named}"
        )
    parent = path.parent
    if not parent.is_dir():
        raise CnnmnistError(f"{path}: the folder {parent} does not exist (create it first)")
    if (parent / "cnnmnist.json").exists() or (parent / "saved_model.pb").exists():
        raise CnnmnistError(
            f"{path}: inside the checkpoint {parent}, which holds only what `train` wrote; "
            "write the picture elsewhere"
        )
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CnnmnistError(f"{path}: exists and is not a plain file; refusing to replace it")
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(512).lstrip()
        except OSError as e:
            raise CnnmnistError(f"{path}: cannot read it: {e.strerror or e}") from None
        if head and not head.startswith(SIGNATURES[kind]):
            raise CnnmnistError(
                f"{path}: exists and is not a {kind.upper()} picture; refusing to replace it "
                "(choose another name, or move it away)"
            )
    return kind
