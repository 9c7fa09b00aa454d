"""Metrics of a checkpoint's SavedModel signature (the authority): on a labelled split, on a
labelled folder of the user's own images, or on the test images under a suite of
corruptions; and the picture of its most confident mistakes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import checkpoint, data, runners, sheets
from cnnmnist.errors import CnnmnistError
from cnnmnist.preprocess import BLANK, IMAGE_SUFFIXES, has_ink, image_files, prepare, prepare_pixels

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
    # A folder of the user's images: the file of every evaluated image, and those that were not
    files: list[str] | None = None
    unreadable: list[dict[str, str]] = field(default_factory=list)

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
        } | ({"unreadable": self.unreadable} if self.files is not None else {})


def _labelled(path: Path, split: str, dataset: str | None, data_dir: Path | None):
    """The checkpoint, and the split of the dataset it is evaluated on (by default the one it was
    trained on), with a warning when that is not the same dataset."""
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
    return ckpt, name, images, labels, warnings


def evaluate(
    path: Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: Path | None = None,
    batch_size: int = 1000,
) -> Report:
    """Run the checkpoint's serving signature over a split and collect the predictions."""
    ckpt, name, images, labels, warnings = _labelled(path, split, dataset, data_dir)
    started = time.perf_counter()
    probabilities = runners.load(ckpt, fast=False).probabilities(images, batch_size)
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


def labelled_files(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """The image files of a folder laid out one subfolder per class, `folder/0/` to `folder/9/`
    (as keras.utils.image_dataset_from_directory reads it), each with its label, found by
    `image_files` (subfolders included, hidden ones not); and notes about what was left
    out. A folder laid out otherwise is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CnnmnistError(f"{folder}: no such folder")
    entries = [e for e in sorted(folder.iterdir()) if not e.name.startswith(".")]
    classes = [e for e in entries if e.is_dir() and e.name in {str(k) for k in range(10)}]
    expected = f"expected one subfolder per digit, {folder}/0/ to {folder}/9/, holding its images"
    others = [e.name for e in entries if e.is_dir() and e not in classes]
    if others:
        raise CnnmnistError(
            f"{folder}: subfolders not named for a digit: {', '.join(others)}; {expected}"
        )
    if not classes:
        raise CnnmnistError(f"{folder}: no class subfolders; {expected}")
    labelled, skipped = [], 0
    for cls in classes:
        found, other = image_files(cls)
        labelled += [(str(p), int(cls.name)) for p in found]
        skipped += other
    if not labelled:
        raise CnnmnistError(f"{folder}: no image files in its digit subfolders; {expected}")
    notes = []
    if skipped:
        notes.append(
            f"{folder}: skipped {skipped} files that are not images by their suffix "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    loose = [e.name for e in entries if e.is_file()]
    if loose:
        notes.append(f"{folder}: ignored {len(loose)} files outside the digit subfolders")
    return labelled, notes


def evaluate_folder(path: Path, folder: Path, batch_size: int = 1000) -> Report:
    """Evaluate on the user's own labelled images, each prepared exactly as `predict` prepares
    it. Files that cannot be read or hold no ink are listed in the report, not evaluated."""
    labelled, notes = labelled_files(folder)
    ckpt = checkpoint.read(path)
    prepared = [(prepare(source), label) for source, label in labelled]
    unreadable = [
        {"file": p.source, "error": p.error or BLANK} for p, _ in prepared if not has_ink(p)
    ]
    ready = [(p, label) for p, label in prepared if has_ink(p)]
    if not ready:
        raise CnnmnistError(f"{folder}: none of its {len(labelled)} images could be read")
    images = np.stack([p.pixels for p, _ in ready])
    started = time.perf_counter()
    probabilities = runners.load(ckpt, fast=False).probabilities(images, batch_size)
    return Report(
        checkpoint=Path(path),
        dataset="images",
        split=str(folder),
        labels=np.array([label for _, label in ready], dtype=np.int64),
        probabilities=probabilities,
        images=images,
        seconds=time.perf_counter() - started,
        warnings=notes,
        files=[p.source for p, _ in ready],
        unreadable=unreadable,
    )


def robustness(
    path: Path,
    split: str = "test",
    dataset: str | None = None,
    data_dir: Path | None = None,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Accuracy on a split, clean and under every corruption of the suite (the --corruptions
    report): one fixed, seeded sample, so two runs on one checkpoint agree exactly. Each
    corruption is scored twice: on the raw corrupted pixels (as MNIST-C scores a model), and
    after `predict`'s preprocessing (what a user who sent that picture gets)."""
    from cnnmnist import corruptions

    ckpt, name, images, labels, warnings = _labelled(path, split, dataset, data_dir)
    started = time.perf_counter()
    model = runners.load(ckpt, fast=False)

    def scored(pixels: np.ndarray) -> dict[str, Any]:
        return _scored(model.probabilities(pixels, batch_size).argmax(axis=1), labels)

    clean = scored(images)
    rows = []
    for corruption, fn in corruptions.CORRUPTIONS.items():
        corrupted = corruptions.apply(corruption, images)
        row = scored(corrupted)
        row["accuracy_prepared"] = scored(prepare_pixels(corrupted))["accuracy"]
        rows.append({"name": corruption, "description": fn.__doc__.strip()} | row)
    mean = float(np.mean([row["accuracy"] for row in rows]))
    return {
        "checkpoint": str(path),
        "dataset": name,
        "split": split,
        "n": len(labels),
        "seed": corruptions.SEED,
        "clean_accuracy": clean["accuracy"],
        "clean_worst_class": clean["worst_class"],
        "corruptions": rows,
        "mean_accuracy": mean,
        "mean_error_ratio": (1 - mean) / max(1 - clean["accuracy"], 1 / len(labels)),
        "clean_accuracy_prepared": scored(prepare_pixels(images))["accuracy"],
        "mean_accuracy_prepared": float(np.mean([row["accuracy_prepared"] for row in rows])),
        "seconds": round(time.perf_counter() - started, 3),
        "warnings": warnings,
    }


def _scored(predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, its 95% interval, and the class with the lowest recall."""
    correct = int((predicted == labels).sum())
    recalls = [row["recall"] for row in per_class(confusion(labels, predicted))]
    worst = int(np.argmin(recalls))
    return {
        "accuracy": correct / len(labels),
        "accuracy_ci95": list(wilson(correct, len(labels))),
        "worst_class": {"label": worst, "recall": recalls[worst]},
    }


def write_errors(report: Report, path: Path, count: int = 36) -> tuple[int, bool]:
    """Draw the most confident mistakes (digit, true -> predicted, confidence) into a PNG,
    atomically; return how many, and whether an existing file was replaced. For a folder of
    the user's images, each original is drawn beside the 28x28 input the model saw."""
    chosen = report.mistakes(count)
    tiles = []
    for i in chosen:
        p = report.probabilities[i]
        original = report.files[i] if report.files is not None else None
        caption = f"{report.labels[i]} as {p.argmax()}  {p.max():.0%}"
        tiles.append(sheets.Tile(report.images[i], caption, original))
    replaced = path.exists()
    sheets.write(tiles, path)
    return len(chosen), replaced
