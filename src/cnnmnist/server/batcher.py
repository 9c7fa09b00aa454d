"""The model behind every request: requests that arrive while it is busy are joined into its
next call, made on a thread of its own so the event loop keeps reading requests meanwhile."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAX_BATCH = 256  # images per model call


@dataclass(eq=False)
class _Job:
    pixels: np.ndarray
    future: asyncio.Future
    done: int = 0  # rows already computed
    rows: list[np.ndarray] = field(default_factory=list)

    @property
    def left(self) -> int:
        return len(self.pixels) - self.done


class Batcher:
    """Runs the model for every request on the event loop, MAX_BATCH images a call at most.
    Each call takes the requests with the fewest images left first, so a one-image request
    never waits behind a long one for more than one call; a long one is computed a slice at
    a time, between the short ones."""

    def __init__(
        self,
        probabilities: Callable[[np.ndarray], np.ndarray],
        observe: Callable[[int], None] = lambda images: None,
    ) -> None:
        self._probabilities = probabilities
        self._observe = observe  # told the size of every model call
        self._pending: list[_Job] = []
        self._draining = False
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cnnmnist-model")

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [N, 10] of pixels [N, 28, 28, 1]."""
        loop = asyncio.get_running_loop()
        job = _Job(pixels, loop.create_future())
        self._pending.append(job)
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await job.future

    def _next_batch(self) -> list[tuple[_Job, int]]:
        """(job, rows) pairs for the next call: shortest first, up to MAX_BATCH rows."""
        self._pending = [job for job in self._pending if not job.future.done()]  # gone clients
        self._pending.sort(key=lambda job: job.left)
        chosen, room = [], MAX_BATCH
        for job in self._pending:
            if room == 0:
                break
            take = min(job.left, room)
            chosen.append((job, take))
            room -= take
        return chosen

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while chosen := self._next_batch():
                batch = np.concatenate(
                    [job.pixels[job.done : job.done + take] for job, take in chosen]
                )
                self._observe(len(batch))
                try:
                    rows = await loop.run_in_executor(self._thread, self._probabilities, batch)
                except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                    for job, _ in chosen:
                        if not job.future.done():
                            job.future.set_exception(e)
                    continue
                start = 0
                for job, take in chosen:
                    job.rows.append(rows[start : start + take])
                    job.done += take
                    start += take
                    if job.left == 0:
                        self._pending.remove(job)
                        if not job.future.done():  # its client may have gone
                            job.future.set_result(np.concatenate(job.rows))
        finally:
            self._draining = False

    @property
    def idle(self) -> bool:
        """Whether no request waits for the model."""
        return not self._pending and not self._draining

    async def call(self, fn, *args):
        """fn(*args) on the model's thread, between its batches (for work that uses the model
        but is no batch of probabilities, such as an explanation)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        """Let the model's thread end once its current call (if any) returns."""
        self._thread.shutdown(wait=False, cancel_futures=True)
