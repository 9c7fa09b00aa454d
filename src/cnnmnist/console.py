"""Rich consoles, tables and the Keras progress callback (Rich is imported only when used)."""

from __future__ import annotations

import sys
import time
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


@cache
def err() -> Console:
    """Progress and status: stderr."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # status lines name paths: never wrap them


def warn(message: str, style: str = "bold yellow") -> None:
    """A warning on stderr (the message is text, never Rich markup)."""
    from rich.markup import escape

    err().print(f"[{style}]warning:[/] {escape(message)}")


@cache
def out() -> Console:
    """Results: stdout."""
    from rich.console import Console

    return Console()


def epoch_line(epoch: int, epochs: int, logs: dict[str, float], seconds: float) -> str:
    """One plain line per epoch, for logs and pipes."""
    parts = [f"epoch {epoch}/{epochs}", f"cost {logs.get('loss', float('nan')):.4f}"]
    if "accuracy" in logs:
        parts.append(f"train acc {logs['accuracy']:.4f}")
    if "val_accuracy" in logs:
        parts.append(f"val acc {logs['val_accuracy']:.4f}")
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def progress_callback(
    epochs: int, steps_per_epoch: int, history: list | None = None, live: bool | None = None
):
    """A Keras callback reporting training: a live Rich bar on a terminal, else a line per
    epoch. Its `history` (continuing `history`, when resuming) gets a row per epoch."""
    import keras

    console = err()
    live = console.is_terminal if live is None else live

    class Progress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.history: list[dict[str, Any]] = list(history or [])
            self._bar = None

        def on_train_begin(self, logs=None):
            if live:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self._bar = Progress(
                    TextColumn("epoch {task.fields[epoch]}/" + str(epochs)),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.4f}"),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                )
                self._bar.start()
                self._task = self._bar.add_task(
                    "train", total=steps_per_epoch, epoch=0, loss=0.0, acc=0.0
                )

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            if self._bar:
                self._bar.reset(
                    self._task, total=steps_per_epoch, epoch=epoch + 1, loss=0.0, acc=0.0
                )

        def on_train_batch_end(self, batch, logs=None):
            if self._bar and logs:
                self._bar.update(
                    self._task,
                    completed=batch + 1,
                    loss=float(logs.get("loss", 0.0)),
                    acc=float(logs.get("accuracy", 0.0)),
                )

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._start
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            row["seconds"] = round(seconds, 3)
            self.history.append(row)
            line = epoch_line(epoch + 1, epochs, row, seconds)
            if self._bar:
                self._bar.console.print(line)
            else:
                print(line, file=sys.stderr, flush=True)

        def on_train_end(self, logs=None):
            if self._bar:
                self._bar.stop()

    return Progress()


def evaluation_report(report: dict[str, Any]):
    """Rich renderables for an evaluation report (the dict from evaluate.Report.to_json)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    low, high = report["accuracy_ci95"]
    headline = Text.assemble(
        ("accuracy ", "bold"),
        (f"{report['accuracy']:.2%}", "bold green"),
        f"  (95% CI {low:.2%} - {high:.2%}, Wilson)   loss {report['loss']:.4f}   "
        f"n {report['n']}   {report['dataset']} / {report['split']}",
    )
    matrix = report["confusion_matrix"]
    worst = {(p["true"], p["predicted"]) for p in report["most_confused"]}
    cm = Table(title="confusion matrix (rows: true, columns: predicted)", show_lines=False)
    cm.add_column("true", justify="right", style="bold")
    for k in range(len(matrix)):
        cm.add_column(str(k), justify="right")
    for t, row in enumerate(matrix):
        cells = []
        for p, count in enumerate(row):
            if t == p:
                cells.append(f"[green]{count}[/]")
            elif (t, p) in worst:
                cells.append(f"[bold red]{count}[/]")
            elif count:
                cells.append(f"[yellow]{count}[/]")
            else:
                cells.append("[dim]0[/]")
        cm.add_row(str(t), *cells)
    pc = Table(title="per class")
    for column in ("label", "precision", "recall", "f1", "support"):
        pc.add_column(column, justify="right")
    for row in report["per_class"]:
        pc.add_row(
            str(row["label"]),
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            str(row["support"]),
        )
    pairs = Table(title="most confused (true -> predicted)")
    pairs.add_column("true", justify="right")
    pairs.add_column("predicted", justify="right")
    pairs.add_column("count", justify="right")
    for p in report["most_confused"]:
        pairs.add_row(str(p["true"]), str(p["predicted"]), str(p["count"]))
    return Group(headline, cm, pc, pairs)


def robustness_table(report: dict[str, Any]):
    """The --corruptions report: one row per corruption, the clean accuracy and the mean."""
    from rich.table import Table

    clean = report["clean_accuracy"]
    table = Table(
        title=f"accuracy under corruption: {report['dataset']} / {report['split']}, "
        f"n {report['n']}, seed {report['seed']}",
        caption=f"mean {report['mean_accuracy']:.2%} (clean {clean:.2%}); the error is "
        f"{report['mean_error_ratio']:.1f}x the clean error on average. Prepared: the same "
        f"pictures through predict's preprocessing, mean {report['mean_accuracy_prepared']:.2%}",
    )
    for column in ("corruption", "accuracy", "vs clean", "worst class (recall)", "prepared"):
        table.add_column(column, justify="left" if column[0] in "cw" else "right")
    table.add_row(
        "(clean)",
        f"{clean:.2%}",
        "",
        _worst(report["clean_worst_class"]),
        f"{report['clean_accuracy_prepared']:.2%}",
    )
    for row in report["corruptions"]:
        drop = row["accuracy"] - clean
        style = "red" if drop < -0.1 else "yellow" if drop < -0.02 else "green"
        table.add_row(
            row["name"],
            f"[{style}]{row['accuracy']:.2%}[/]",
            f"{drop:+.2%}",
            _worst(row["worst_class"]),
            f"{row['accuracy_prepared']:.2%}",
        )
    return table


def _worst(worst: dict[str, Any]) -> str:
    return f"{worst['label']} ({worst['recall']:.0%})"


def metadata_summary(path: str, meta: dict[str, Any]):
    """Rich renderables summarising a checkpoint's metadata."""
    from rich.console import Group
    from rich.table import Table

    info = Table(title=f"checkpoint {path}", show_header=False)
    info.add_row("preset", str(meta.get("preset")))
    for key, value in (meta.get("hyperparameters") or {}).items():
        info.add_row(key, str(value))
    dataset = meta.get("dataset") or {}
    info.add_row(
        "dataset",
        f"{dataset.get('name')} ({dataset.get('train_size')} train, "
        f"{dataset.get('validation_size')} validation)",
    )
    test = meta.get("test") or {}
    if test:
        info.add_row("test accuracy", f"{test.get('accuracy', 0):.4f} (n={test.get('n')})")
        info.add_row("test loss", f"{test.get('loss', 0):.4f}")
    if meta.get("reference_accuracy"):
        info.add_row("reference accuracy", f"{meta['reference_accuracy']:.4f}")
    versions = meta.get("versions") or {}
    info.add_row("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))
    info.add_row("created", str(meta.get("created")))
    info.add_row("format version", str(meta.get("format_version")))
    history = Table(title="history")
    columns = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]
    rows = meta.get("history") or []
    columns = [c for c in columns if any(c in r for r in rows)]
    for column in columns:
        history.add_column(column, justify="right")
    for r in rows:
        history.add_row(*(_fmt(r.get(c)) for c in columns))
    return Group(info, history)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


RAMP = " .:-=+*#%@"


def ascii_digit(pixels) -> str:
    """The 28x28 picture the model saw, as text (two characters per pixel, darkest = no ink)."""
    return "\n".join(
        "".join(RAMP[min(len(RAMP) - 1, int(v) * len(RAMP) // 256)] * 2 for v in row)
        for row in pixels
    )


def prediction_table(results: list[dict[str, Any]], show: bool = False):
    """Rich renderables for `predict` results (file, digit, confidence, next candidates, notes)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"predictions ({results[0]['engine'] if results else '-'})")
    for column, justify in (
        ("file", "left"),
        ("digit", "right"),
        ("confidence", "right"),
        ("next candidates", "left"),
        ("notes", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    pictures = []
    for r in results:
        if r["error"]:
            table.add_row(r["file"], "-", "-", "", Text(f"error: {r['error']}", style="red"))
            continue
        digit = "-" if r["digit"] is None else str(r["digit"])
        confidence = "-" if r["confidence"] is None else f"{r['confidence']:.1%}"
        others = ", ".join(f"{t['digit']} {t['probability']:.1%}" for t in r["top"][1:])
        table.add_row(
            r["file"], digit, confidence, others, Text("; ".join(r["warnings"]), style="yellow")
        )
        if show and r.get("pixels") is not None:
            pictures.append(Text(f"{r['file']}: the 28x28 input the model saw\n", style="bold"))
            pictures.append(Text(ascii_digit(r["pixels"]) + "\n"))
    return Group(table, *pictures)
