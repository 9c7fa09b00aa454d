"""Telling the user how a run goes: the header before the first step, a live bar on a terminal
(else a line per epoch), and the history each epoch adds. One vocabulary throughout: loss,
accuracy, val_loss, val_accuracy, as the history, --json and the README name them."""

from __future__ import annotations

import sys
import time
from typing import Any

import keras

from cnnmnist import render


def epoch_line(epoch: int, epochs: int, logs: dict[str, float], seconds: float) -> str:
    """One plain line per epoch, for logs and pipes."""
    parts = [f"epoch {epoch}/{epochs}", f"loss {logs.get('loss', float('nan')):.4f}"]
    for key in ("accuracy", "val_loss", "val_accuracy"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4f}")
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


class Progress(keras.callbacks.Callback):
    """A live Rich bar on a terminal (`live`), else a line per epoch; its `history`
    (continuing `history`, when resuming) gets a row per epoch."""

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int,
        history: list | None = None,
        live: bool | None = None,
    ) -> None:
        super().__init__()
        self.epochs, self.steps = epochs, steps_per_epoch
        self.history: list[dict[str, Any]] = list(history or [])
        self.live = render.err().is_terminal if live is None else live
        self._bar = None

    def on_train_begin(self, logs=None):
        if not self.live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(
            SpinnerColumn(),
            TextColumn("epoch {task.fields[epoch]}/" + str(self.epochs)),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeRemainingColumn(),
            console=render.err(),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.steps, epoch=0, metrics="")

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        if self._bar:
            # The first steps of a run trace the step function: say so until they return.
            first = "tracing the training step ..." if epoch == len(self.history) else ""
            self._bar.reset(self._task, total=self.steps, epoch=epoch + 1, metrics=first)

    def on_train_batch_end(self, batch, logs=None):
        if self._bar and logs:
            metrics = f"loss {logs.get('loss', 0.0):.4f}  accuracy {logs.get('accuracy', 0.0):.4f}"
            self._bar.update(self._task, completed=batch + 1, metrics=metrics)

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        row["seconds"] = round(seconds, 3)
        self.history.append(row)
        line = epoch_line(epoch + 1, self.epochs, row, seconds)
        if self._bar:
            self._bar.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def on_train_end(self, logs=None):
        if self._bar:
            self._bar.stop()
