"""Learning curves from a checkpoint's recorded history, drawn with matplotlib (an extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from cnnmnist import files
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


FORMATS = ("png", "svg", "pdf")  # what the pictures may be written as, by the file's suffix


def _save(figure, path: Path) -> None:
    """Write the figure atomically, in the format its suffix names (checked beforehand by
    files.output_file)."""
    figure.tight_layout()
    kind = path.suffix.lower().removeprefix(".")
    files.atomic_write(path, lambda f: figure.savefig(f, format=kind, dpi=DPI))


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


CONFUSION_SIZE = (6.4, 5)  # inches


def confusion(report: dict[str, Any], path: Path) -> None:
    """An evaluation's confusion matrix with the counts written in, rows the true digit: the
    diagonal (right answers) in grey by its share of the class, the mistakes in red on their
    own scale (the largest mistake darkest), so that they show at a glance however few."""
    import numpy as np

    figure = _figure(CONFUSION_SIZE)
    axes = figure.subplots()
    matrix = np.array(report["confusion_matrix"])
    diagonal = np.eye(len(matrix), dtype=bool)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    mistakes = np.where(diagonal, 0, matrix)
    worst = max(int(mistakes.max()), 1)
    axes.imshow(np.ma.masked_where(~diagonal, share), cmap="Greys", vmin=0, vmax=1.6)
    shown = axes.imshow(
        np.ma.masked_where(diagonal | (matrix == 0), mistakes), cmap="Reds", vmin=0, vmax=worst
    )
    for (t, p), count in np.ndenumerate(matrix):
        if count:
            dark = (t == p and share[t, p] > 0.8) or (t != p and count > worst * 0.6)
            axes.text(
                p,
                t,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
    axes.set_xticks(range(len(matrix)))
    axes.set_yticks(range(len(matrix)))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.colorbar(shown, ax=axes, label="mistakes (count)")
    axes.set_title(
        f"{report['dataset']} / {report['split']}: accuracy {report['accuracy']:.2%} "
        f"(n {report['n']})",
        fontsize=9,
    )
    _save(figure, path)


def mosaic(maps, columns: int = 16, gap: int = 1, scaled: bool = True):
    """Maps [h, w, c] (feature maps, kernels) side by side in rows of `columns`, NaN between
    them (drawn as the background); with `scaled`, each map stretched to 0..1 over its own
    range, so a weak map's pattern shows as well as a strong one's."""
    import numpy as np

    maps = np.asarray(maps, np.float64)
    h, w, count = maps.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap), np.nan)
    for k in range(count):
        m = maps[:, :, k]
        if scaled:
            low, high = float(m.min()), float(m.max())
            m = (m - low) / (high - low) if high > low else np.zeros_like(m)
        r, c = divmod(k, columns)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = m
    return out


def explanation(result: dict[str, Any], path: Path) -> None:
    """One digit explained: the image and the 28x28 input the model saw, where the evidence
    for the answer and for the runner-up lies (red: for, blue: against), the ten
    probabilities, then each block's feature maps with the block's kernel, stride and
    output shape."""
    layers = result["layers"]
    tiles = [mosaic(layer["maps"]) for layer in layers]
    # The mosaics span the width (about 10.5 inches): each row as tall as its mosaic needs.
    heights = [2.2] + [0.45 + 10.5 * t.shape[0] / t.shape[1] for t in tiles]
    figure = _figure((11, sum(heights)))
    grid = figure.add_gridspec(len(heights), 5, height_ratios=heights)
    _answer_row(figure, [figure.add_subplot(grid[0, k]) for k in range(5)], result)
    for row, (layer, tile) in enumerate(zip(layers, tiles, strict=True), start=1):
        axes = figure.add_subplot(grid[row, :])
        axes.imshow(tile, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        h, w, c = layer["shape"]
        axes.set_title(
            f"{layer['name']}: {layer['what']} -> {h}x{w}x{c} feature maps", fontsize=9, loc="left"
        )
    figure.suptitle(f"{result['file']}: {result['digit']} ({result['confidence']:.1%})")
    _save(figure, path)


def _answer_row(figure, top: list, result: dict[str, Any]) -> None:
    """The image, the input, the two evidence maps over the input, the probabilities."""
    import numpy as np

    original = result.get("original")
    if original is not None:
        top[0].imshow(original, cmap="gray", vmin=0, vmax=1)
    top[0].set_title("the image", fontsize=9)
    top[1].imshow(result["input"], cmap="gray", vmin=0, vmax=255)
    top[1].set_title("what the model saw (28x28)", fontsize=9)
    for axes, key, digit in (
        (top[2], "saliency", result["digit"]),
        (top[3], "saliency_runner_up", result["runner_up"]),
    ):
        evidence = np.asarray(result[key])
        reach = max(float(np.abs(evidence).max()), 1e-9)
        axes.imshow(result["input"], cmap="gray", vmin=0, vmax=255)
        axes.imshow(evidence, cmap="bwr", vmin=-reach, vmax=reach, alpha=0.6)
        p = result["probabilities"][digit]
        axes.set_title(f"evidence for {digit} ({p:.1%})", fontsize=9)
        axes.set_xlabel("red: for it, blue: against", fontsize=7)
    colours = ["#2a2" if k == result["digit"] else "#36c" for k in range(10)]
    top[4].barh(range(10), result["probabilities"], color=colours)
    top[4].set_yticks(range(10))
    top[4].invert_yaxis()
    top[4].set_xlim(0, 1)
    top[4].set_title("probabilities", fontsize=9)
    for axes in top[:4]:
        axes.set_xticks([])
        axes.set_yticks([])


def filters(kernels: list[tuple[str, Any]], path: Path, title: str) -> None:
    """The first convolution's kernels as small images, and the next ones' summarised (each
    output filter's mean absolute weight over its input channels); red positive, blue
    negative."""
    import numpy as np

    panels = []
    for row, (name, weights) in enumerate(kernels):
        weights = np.asarray(weights, np.float64)  # [kh, kw, in, out]
        size = f"{name}: {weights.shape[3]} kernels {weights.shape[0]}x{weights.shape[1]}"
        if row == 0:
            shown = weights.mean(axis=2) if weights.shape[2] > 1 else weights[:, :, 0, :]
            what = f"{size}, each scaled to its largest weight: red positive, blue negative"
            panels.append((what, _signed_mosaic(shown), "bwr", -1))
        else:
            what = (
                f"{size}x{weights.shape[2]}, each shown as its mean |weight| over the inputs "
                "(brighter: larger)"
            )
            panels.append((what, mosaic(np.abs(weights).mean(axis=2)), "magma", 0))
    width = 10  # inches; each panel as tall as its mosaic needs, plus its title
    heights = [width * tile.shape[0] / tile.shape[1] + 0.45 for _, tile, _, _ in panels]
    figure = _figure((width, 0.6 + sum(heights)))
    grid = figure.add_gridspec(len(panels), 1, height_ratios=heights)
    for row, (what, tile, cmap, low) in enumerate(panels):
        axes = figure.add_subplot(grid[row])
        axes.imshow(tile, cmap=cmap, vmin=low, vmax=1, interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(what, fontsize=9, loc="left")
    figure.suptitle(title)
    _save(figure, path)


def _signed_mosaic(kernels):
    """Kernels [h, w, c] side by side, each divided by its largest |weight| (sign kept)."""
    import numpy as np

    kernels = np.asarray(kernels, np.float64)
    reach = np.abs(kernels).max(axis=(0, 1), keepdims=True)
    return mosaic(kernels / np.maximum(reach, 1e-12), scaled=False)
