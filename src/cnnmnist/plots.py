"""Learning curves from a checkpoint's recorded history, drawn with matplotlib (an extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from cnnmnist.errors import CnnmnistError

SIZE = (10, 4)  # inches
DPI = 100  # so the picture is SIZE * DPI pixels


def _figure(size=SIZE):
    """A matplotlib figure drawn off-screen (matplotlib is an extra: say how to get it)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CnnmnistError("--plot needs matplotlib: pip install 'cnnmnist[plot]'")
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI)


def _save(figure, path: Path) -> None:
    from cnnmnist.evaluate import atomic_write

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=DPI))


def curves(meta: dict[str, Any], path: Path, title: str) -> None:
    """Loss and accuracy per epoch (training, and validation when recorded), with the test
    result marked after the last epoch; written atomically as a PNG."""
    figure = _figure()
    from matplotlib.ticker import MaxNLocator

    history = meta.get("history") or []
    if not history:
        raise CnnmnistError(f"{title}: no training history recorded, nothing to plot")
    epochs = [row["epoch"] for row in history]
    test = meta.get("test") or {}
    for axes, key, label in zip(
        figure.subplots(1, 2), ("loss", "accuracy"), ("cross-entropy", "accuracy"), strict=True
    ):
        axes.plot(epochs, [row.get(key) for row in history], "o-", label="training")
        if any(f"val_{key}" in row for row in history):
            axes.plot(epochs, [row.get(f"val_{key}") for row in history], "s-", label="validation")
        if key in test:
            axes.plot([epochs[-1]], [test[key]], "r*", markersize=14, label="test")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{title}: {meta.get('preset')}")
    _save(figure, path)


CONFUSION_SIZE = (6, 5)  # inches


def confusion(report: dict[str, Any], path: Path) -> None:
    """An evaluation's confusion matrix as a heat map with the counts written in, rows the
    true digit; written atomically as a PNG."""
    import numpy as np

    figure = _figure(CONFUSION_SIZE)
    axes = figure.subplots()
    matrix = np.array(report["confusion_matrix"])
    # Row-normalised colours, so that a class's mistakes show whatever its support.
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (t, p), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if share[t, p] > 0.5 else ("red" if t != p else "black")
            axes.text(p, t, str(count), ha="center", va="center", color=colour, fontsize=7)
    axes.set_xticks(range(len(matrix)))
    axes.set_yticks(range(len(matrix)))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.colorbar(image, ax=axes, label="share of the true class")
    axes.set_title(
        f"{report['dataset']} / {report['split']}: accuracy {report['accuracy']:.2%} "
        f"(n {report['n']})",
        fontsize=9,
    )
    _save(figure, path)
