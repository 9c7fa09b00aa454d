"""Metrics from a checkpoint's SavedModel signature on a labelled split."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import checkpoint, data

SPLITS = ("test", "validation", "train")
Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: int = 10) -> np.ndarray:
    """Counts with rows = true label, columns = predicted label."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def per_class(matrix: np.ndarray) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of every class from a confusion matrix."""
    rows = []
    for k in range(len(matrix)):
        tp = int(matrix[k, k])
        predicted, support = int(matrix[:, k].sum()), int(matrix[k, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {"label": k, "precision": precision, "recall": recall, "f1": f1, "support": support}
        )
    return rows


def confused_pairs(matrix: np.ndarray, top: int = 5) -> list[dict[str, int]]:
    """The off-diagonal cells with the most mistakes, largest first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None, kind="stable")[::-1][:top]
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [
        {"true": int(t), "predicted": int(p), "count": int(off[t, p])}
        for t, p in pairs
        if off[t, p]
    ]


@dataclass
class Report:
    """Everything `evaluate` found; `to_json` is the --json output."""

    checkpoint: Path
    dataset: str
    split: str
    labels: np.ndarray
    probabilities: np.ndarray
    images: np.ndarray = field(repr=False)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> int:
        return int((self.predicted == self.labels).sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def loss(self) -> float:
        """Mean cross-entropy of the true labels (probabilities clipped away from 0)."""
        p = self.probabilities[np.arange(self.n), self.labels.astype(np.int64)].astype(np.float64)
        return float(-np.log(np.clip(p, 1e-12, 1.0)).mean()) if self.n else 0.0

    @property
    def matrix(self) -> np.ndarray:
        return confusion(self.labels, self.predicted)

    def mistakes(self, count: int) -> np.ndarray:
        """Indices of the most confident wrong predictions, most confident first."""
        wrong = np.flatnonzero(self.predicted != self.labels)
        confidence = self.probabilities[wrong].max(axis=1)
        return wrong[np.argsort(-confidence, kind="stable")][:count]

    def to_json(self) -> dict[str, Any]:
        matrix = self.matrix
        return {
            "checkpoint": str(self.checkpoint),
            "dataset": self.dataset,
            "split": self.split,
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "accuracy_ci95": list(wilson(self.correct, self.n)),
            "loss": self.loss,
            "confusion_matrix": matrix.tolist(),
            "per_class": per_class(matrix),
            "most_confused": confused_pairs(matrix),
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


def evaluate(
    path: Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: Path | None = None,
    batch_size: int = 1000,
) -> Report:
    """Run the checkpoint's serving signature over a split and collect the predictions."""
    ckpt = checkpoint.read(path)
    meta = ckpt.metadata.get("dataset", {})
    trained_on = meta.get("name", "mnist")
    warnings = []
    if dataset and dataset != trained_on:
        warnings.append(
            f"{path} was trained on {trained_on}, but is evaluated on {dataset}: "
            "expect the numbers to mean little"
        )
    name = dataset or trained_on
    images, labels = data.load(name, data_dir).split(split, int(meta.get("validation_size", 5000)))
    started = time.perf_counter()
    probabilities = ckpt.predict(images, batch_size=batch_size)
    return Report(
        checkpoint=Path(path),
        dataset=name,
        split=split,
        labels=labels,
        probabilities=probabilities,
        images=images,
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )


# The --errors picture: a grid of the most confident mistakes.
ERROR_COLUMNS = 6
ERROR_SCALE = 3
ERROR_CAPTION = 16


def error_grid_size(count: int) -> tuple[int, int]:
    """Width and height in pixels of the --errors picture for `count` mistakes."""
    columns = min(max(count, 1), ERROR_COLUMNS)
    rows = max(1, math.ceil(count / ERROR_COLUMNS))
    return columns * 28 * ERROR_SCALE, rows * (28 * ERROR_SCALE + ERROR_CAPTION)


def write_errors(report: Report, path: Path, count: int = 36) -> tuple[int, bool]:
    """Draw the most confident mistakes (digit, true -> predicted, confidence) into a PNG,
    atomically; return how many, and whether an existing file was replaced."""
    from PIL import Image, ImageDraw

    chosen = report.mistakes(count)
    side = 28 * ERROR_SCALE
    sheet = Image.new("L", error_grid_size(len(chosen)), color=255)
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(chosen):
        x, y = (k % ERROR_COLUMNS) * side, (k // ERROR_COLUMNS) * (side + ERROR_CAPTION)
        digit = Image.fromarray(255 - report.images[i]).resize((side, side), Image.NEAREST)
        sheet.paste(digit, (x, y))
        p = report.probabilities[i]
        caption = f"{report.labels[i]} as {p.argmax()}  {p.max():.0%}"
        draw.text((x + 4, y + side + 2), caption, fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    replaced = path.exists()
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))
    return len(chosen), replaced


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it into place: a
    reader never sees half a file, and a failure leaves what was there."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~checkpoint.umask())  # as open() makes it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
