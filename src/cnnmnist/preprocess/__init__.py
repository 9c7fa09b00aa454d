"""Image preparation: a user's image file made to look like an MNIST digit, as named stages
that each can be tested on its own:

    read      bounded bytes, decoded by an allow-list of formats, upright, grey and alpha
    paper     ink and paper told apart under uneven light; the paper's level taken away
    rules     the lines of ruled or squared paper taken out
    paper     grain, dust and sensor noise taken out
    rules     slivers of lines left along the edges taken out
    mnist     cropped, fitted to 20 px, centred by mass in 28 x 28

This is what the MNIST authors did to their own digits; without it a good model misreads
photos and drawings. `predict`, `evaluate`, `explain`, `serve` and the benchmarks prepare
images here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cnnmnist.preprocess import mnist, paper, rules
from cnnmnist.preprocess.mnist import BLANK, to_mnist
from cnnmnist.preprocess.read import (
    FORMAT_NAMES,
    IMAGE_SUFFIXES,
    STDIN,
    ImageError,
    decode,
    image_files,
    read_bounded,
    read_file,
)

__all__ = [
    "BLANK",
    "FORMAT_NAMES",
    "IMAGE_SUFFIXES",
    "STDIN",
    "ImageError",
    "Prepared",
    "decode",
    "has_ink",
    "image_files",
    "ink_map",
    "mean_abs_change",
    "mnist",
    "prepare",
    "prepare_pixels",
    "read_bounded",
    "read_file",
    "to_mnist",
]


@dataclass
class Prepared:
    """One input after preprocessing: the 28x28 pixels the model sees, or why there are none."""

    source: str
    pixels: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    grey: np.ndarray | None = None  # the decoded image (grey, upright), for pictures of it


def ink_map(grey: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """The digit's ink in [0, 1] (1 = stroke) from a grey image in [0, 1]: the paper stages,
    then the lines, then the noise, then the lines' slivers."""
    grey = np.asarray(grey, dtype=np.float64)
    if grey.ndim != 2 or grey.size == 0 or not np.isfinite(grey).all():
        raise ImageError(f"expected a finite 2-D grey image, got shape {grey.shape}")
    ink, sigma = paper.ink_on_paper(grey, alpha)
    if not ink.any():
        return ink
    ink = rules.without_rules(ink, rules.trace_level(sigma, paper.INK_FLOOR))
    ink = paper.without_noise(ink, sigma)
    return rules.without_slivers(ink, paper.INK_FLOOR)


def prepare(source: str, blob: bytes | None = None, keep_image: bool = False) -> Prepared:
    """Read, decode and normalise one input; failures are recorded, never raised.
    `keep_image`: keep the decoded grey image too."""
    try:
        if blob is None:
            blob = read_file(source)
        grey, alpha, notes = decode(blob, source)
        pixels, warnings = to_mnist(ink_map(grey, alpha))
        return Prepared(source, pixels, notes + warnings, grey=grey if keep_image else None)
    except ImageError as e:
        return Prepared(source, error=str(e))


def has_ink(prepared: Prepared) -> bool:
    """Whether there is a digit to predict (a blank image is answered with no digit)."""
    return prepared.pixels is not None and bool(prepared.pixels.any())


def prepare_pixels(images: np.ndarray) -> np.ndarray:
    """Grey uint8 images [N, H, W] (already decoded) through the same preprocessing."""
    return np.stack([to_mnist(ink_map(image / 255.0))[0] for image in images])


def mean_abs_change(images: np.ndarray) -> float:
    """How far preprocessing moves MNIST digits (0 = identity), in grey levels per pixel."""
    return float(np.abs(prepare_pixels(images).astype(float) - images.astype(float)).mean())
