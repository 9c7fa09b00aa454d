"""What is served: a checkpoint (its runner and the batcher in front of it), and the versions of
the model as TensorFlow Serving lays them out: one checkpoint (version 1), or a base folder of
numbered checkpoints (BASE/1/, BASE/2/, ...) whose highest version is served, a new one loaded
and swapped in when it appears, with no request lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import checkpoint, runners
from cnnmnist.errors import CheckpointError, CnnmnistError
from cnnmnist.server.batcher import Batcher

POLL_SECONDS = 2.0  # how often the base folder is looked at for a new version
DRAIN_SECONDS = 30.0  # the most a replaced version waits for its queued requests


class Servable:
    """A checkpoint being served: its runner (TFLite when verified) and the batcher in front
    of it. `observe` is told the size of every model call."""

    def __init__(
        self,
        path: Path,
        name: str,
        warn: Callable[[str], None],
        version: int = 1,
        observe: Callable[[int], None] = lambda images: None,
    ) -> None:
        ckpt = checkpoint.read(path)
        self.path, self.name, self.version, self.warn = Path(path), name, version, warn
        self.runner = runners.load(ckpt, warn)
        self.run = Batcher(self.runner.probabilities, observe)  # awaitable: probabilities
        self.retired_at: float | None = None
        self._explainer = None

    def explain(self, prepared) -> dict[str, Any]:
        """The explanation of a prepared digit, as the page draws it (run it on the model's
        thread, `run.call`, which its runner is confined to: the explainer is made on first
        use, around the same runner)."""
        from cnnmnist import explain

        if self._explainer is None:
            self._explainer = explain.Explainer(self.path, self.warn, self.runner)
        result = self._explainer(prepared)
        return explain.for_page(result | {"engine": self._explainer.runner.name})

    def close(self) -> None:
        """Release the model's thread."""
        self.run.close()


@dataclass
class Version:
    """A version seen in the base folder: its state as TF Serving names them, and why."""

    number: int
    state: str  # "AVAILABLE", "END" (replaced, or failed to load)
    message: str = ""


def is_checkpoint(path: Path) -> bool:
    """Whether `path` looks like one checkpoint (not a base folder of versions)."""
    return (path / checkpoint.METADATA).exists() or (path / "saved_model.pb").exists()


def numbered(base: Path) -> list[int]:
    """The version numbers under `base`: its subfolders named by a positive whole number."""
    found = []
    for entry in base.iterdir():
        if entry.name.isdigit() and int(entry.name) > 0 and entry.is_dir():
            found.append(int(entry.name))
    return sorted(found)


class Servables:
    """The model's versions: `current` answers requests; `poll` looks for a newer one."""

    def __init__(
        self,
        path: Path,
        name: str,
        warn: Callable[[str], None],
        log: Callable[[str], None] = lambda line: None,
        observe: Callable[[int], None] = lambda images: None,
    ) -> None:
        self.path, self.name, self.warn, self.log = Path(path), name, warn, log
        self.observe = observe
        self.versions: dict[int, Version] = {}
        if not self.path.is_dir():
            checkpoint.read(self.path)  # its own error: no such directory, a file, ...
        self.single = is_checkpoint(self.path)
        if self.single:
            self.current = self._open(self.path, 1)
        else:
            self.current = self._first()
        self.versions[self.current.version] = Version(self.current.version, "AVAILABLE")
        self._retiring: list[Servable] = []

    def _open(self, path: Path, number: int) -> Servable:
        # Through self.observe at each call: the application sets it after the first load.
        return Servable(path, self.name, self.warn, number, lambda images: self.observe(images))

    def _first(self) -> Servable:
        """The highest version of the base folder that loads."""
        found = numbered(self.path)
        if not found:
            raise CnnmnistError(
                f"{self.path}: neither a checkpoint nor a base folder of numbered checkpoints "
                f"({self.path}/1/, {self.path}/2/, ...); train one with "
                f"`cnnmnist train --out {self.path}/1`"
            )
        failures = []
        for number in reversed(found):
            try:
                return self._open(self.path / str(number), number)
            except CheckpointError as e:
                failures.append(str(e))
                self.versions[number] = Version(number, "END", str(e))
        raise CnnmnistError(f"{self.path}: no version loads: {'; '.join(failures)}")

    def get(self, version: int | None) -> Servable:
        """The model answering for `version` (None: the current one); KeyError if none."""
        if version is None or version == self.current.version:
            return self.current
        raise KeyError(version)

    def statuses(self) -> list[tuple[int, str, str]]:
        """Each version's (number, state, message), newest first, as TF Serving lists them."""
        return [
            (v.number, v.state, v.message)
            for v in sorted(self.versions.values(), key=lambda v: -v.number)
        ]

    async def poll(self, seconds: float = POLL_SECONDS) -> None:
        """Until cancelled: every `seconds`, load a newer version if one appeared."""
        if self.single:
            return
        while True:
            await asyncio.sleep(seconds)
            await self.refresh()
            self._retire()

    async def refresh(self) -> None:
        """Load the newest version if it is newer than the current one and not known to fail;
        swap it in once it answers. A version that fails is logged and skipped, and the
        current one keeps serving."""
        loop = asyncio.get_running_loop()
        newer = [n for n in numbered(self.path) if n > self.current.version]
        newer = [n for n in newer if n not in self.versions]
        if not newer:
            return
        number = newer[-1]
        try:
            model = await loop.run_in_executor(None, self._load, number)
        except CheckpointError as e:
            if "incomplete checkpoint" in str(e):
                return  # still being copied in: looked at again next time
            self.versions[number] = Version(number, "END", str(e))
            self.log(f"version {number} of {self.name!r} was not loaded: {e}")
            return
        old, self.current = self.current, model
        self.versions[old.version] = Version(old.version, "END", "replaced by a newer version")
        self.versions[number] = Version(number, "AVAILABLE")
        self._retiring.append(old)
        self.log(f"serving version {number} of {self.name!r} (was {old.version})")

    def _load(self, number: int) -> Servable:
        """A version loaded and tried on a blank image before it answers anyone."""
        model = self._open(self.path / str(number), number)
        try:
            model.runner.probabilities(np.zeros((1, 28, 28, 1), np.float32))
        except Exception as e:  # noqa: BLE001 - any failure of a new version keeps the old
            model.close()
            raise CheckpointError(f"{self.path / str(number)}: does not run ({e})") from None
        return model

    def _retire(self) -> None:
        """Close replaced versions once no request waits for them (or after DRAIN_SECONDS)."""
        now = time.monotonic()
        for model in list(self._retiring):
            model.retired_at = model.retired_at or now
            if model.run.idle or now - model.retired_at > DRAIN_SECONDS:
                model.close()
                self._retiring.remove(model)

    def close(self) -> None:
        """Release every version's thread."""
        for model in [self.current, *self._retiring]:
            model.close()
