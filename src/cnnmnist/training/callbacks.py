"""What watches a training run: divergence, Ctrl-C, and the state saved after every epoch."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator

import keras

# A mean cross-entropy this large puts e^-10000 on the true class: the weights have blown up
# even while the number is still finite (Adam at lr 1000 gets here, then ReLUs die silently).
EXPLODED_LOSS = 1e4


class Safekeeping(keras.callbacks.Callback):
    """Stops at the first non-finite or exploded loss, or after a Ctrl-C (at the end of the
    running chunk of loop.CHUNK steps), and otherwise calls save_epoch(epochs completed)
    after every completed epoch."""

    def __init__(self, save_epoch) -> None:
        super().__init__()
        self._save_epoch = save_epoch
        self.diverged: tuple[int, int, float] | None = None
        self.interrupted = False
        self.completed = 0  # epochs whose state is saved

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss) or loss > EXPLODED_LOSS:
            self.diverged = (self._epoch + 1, batch + 1, loss)
        if self.diverged or self.interrupted:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if not (self.diverged or self.interrupted):  # a cut-short epoch is not saved
            self._save_epoch(epoch + 1)
            self.completed = epoch + 1


@contextlib.contextmanager
def sigint_to(keeper) -> Iterator[None]:
    """The first Ctrl-C asks training to stop at the end of the running chunk; a second one
    aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        keeper.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
