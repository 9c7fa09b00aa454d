"""Learning curves from a checkpoint's recorded history, drawn with matplotlib (an extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from cnnmnist.errors import CnnmnistError

SIZE = (10, 4)  # inches
DPI = 100  # so the picture is SIZE * DPI pixels


def curves(meta: dict[str, Any], path: Path, title: str) -> None:
    """Loss and accuracy per epoch (training, and validation when recorded), with the test
    result marked after the last epoch; written atomically as a PNG."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CnnmnistError("--plot needs matplotlib: pip install 'cnnmnist[plot]'")
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from cnnmnist.evaluate import atomic_write

    history = meta.get("history") or []
    if not history:
        raise CnnmnistError(f"{title}: no training history recorded, nothing to plot")
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=SIZE, dpi=DPI)
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
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=DPI))
