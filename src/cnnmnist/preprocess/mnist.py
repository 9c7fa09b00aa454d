"""MNIST's own normalisation: the ink cropped, its longer side fitted to 20 pixels (strokes
thinned where wider than MNIST's), placed in 28 x 28 with its centre of mass at the centre
(Pillow's resampling, OpenCV's moments and erosion)."""

from __future__ import annotations

import cv2
import numpy as np

from cnnmnist.preprocess.paper import INK_FLOOR
from cnnmnist.preprocess.read import ImageError

BOX = 20  # MNIST digits fit a 20 x 20 box ...
CENTRE = 14.0  # ... placed with their centre of mass at pixel (14, 14) of 28 x 28 (measured)
UPSCALE_CURVE = (0.3, 0.7)  # ink levels mapped to 0 and 1 when a small digit is enlarged
MAX_STROKE = 4.5  # px in the 20-px box: about 1% of MNIST's digits have wider strokes (measured)
MAX_THINNING = 3  # pixels a stroke too wide loses at most, one at a time
BLANK = "no ink found: the image looks blank"


def to_mnist(ink: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """MNIST's own normalisation: crop to the ink, fit the longer side to 20 px (area-averaged),
    centre the centre of mass in 28 x 28. Returns uint8 pixels and warnings."""
    ink = np.asarray(ink, dtype=np.float64)
    if ink.ndim != 2 or ink.size == 0 or not np.isfinite(ink).all():
        raise ImageError(f"expected a finite 2-D ink map, got shape {ink.shape}")
    mask = ink > INK_FLOOR
    if not mask.any():
        return np.zeros((28, 28), np.uint8), [BLANK]
    warnings = []
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if top == 0 or left == 0 or bottom == ink.shape[0] or right == ink.shape[1]:
        warnings.append("ink touches the image border: the digit may be cut off")
    crop = _thin(_in_box(np.where(mask, ink, 0.0)[top:bottom, left:right].astype(np.float32)))
    if not crop.any():  # faint specks the contrast curve took for the ink's blurred edge
        return np.zeros((28, 28), np.uint8), [*warnings, BLANK]
    return np.round(np.clip(_centred(crop), 0, 1) * 255).astype(np.uint8), warnings


def _in_box(crop: np.ndarray) -> np.ndarray:
    """The cropped ink with its longer side BOX pixels: area-averaged when shrinking;
    when enlarging, Lanczos (it blurs less than bilinear), then a contrast curve."""
    from PIL import Image

    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return crop
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
    crop = np.asarray(Image.fromarray(crop, mode="F").resize(size, resample=resample))
    if scale > 1:
        # Enlarging a digit of a few pixels smears each into a ramp; MNIST's digits were
        # written large and have steep edges. The curve restores them (measured on 8x8 scans
        # by other writers: benchmarks/robustness.py); it also clips Lanczos's ringing.
        low, high = UPSCALE_CURVE
        crop = np.clip((crop - low) / (high - low), 0, 1)
    return crop


def _centred(crop: np.ndarray) -> np.ndarray:
    """The crop placed in 28 x 28 with its centre of mass at (CENTRE, CENTRE), as near as
    whole pixels go without pushing ink off the canvas."""
    h, w = crop.shape
    y0, x0 = (28 - h) // 2, (28 - w) // 2
    canvas = np.zeros((28, 28), np.float64)
    canvas[y0 : y0 + h, x0 : x0 + w] = crop
    mass = cv2.moments(canvas)
    dy = min(max(round(CENTRE - mass["m01"] / mass["m00"]), -y0), 28 - h - y0)
    dx = min(max(round(CENTRE - mass["m10"] / mass["m00"]), -x0), 28 - w - x0)
    out = np.zeros((28, 28), np.float64)
    out[y0 + dy : y0 + dy + h, x0 + dx : x0 + dx + w] = crop
    return out


def stroke_width(ink: np.ndarray) -> float:
    """The strokes' mean width in pixels: twice the ink's area over the length of its outline
    (a stroke w wide and L long has area wL and an outline about 2L long). The outline is
    the summed change between neighbouring pixels, so grey edges count in proportion; pi/4
    turns the two axes' sums into a length whatever the edges' direction."""
    edges = np.pad(ink, 1)
    outline = np.abs(np.diff(edges, axis=0)).sum() + np.abs(np.diff(edges, axis=1)).sum()
    return float(2 * ink.sum() / (outline * np.pi / 4)) if outline else 0.0


# A 2 x 2 window anchored at its top-left pixel: erosion keeps each pixel's least ink of it.
_TWO_BY_TWO = np.ones((2, 2), np.uint8)


def _thin(crop: np.ndarray) -> np.ndarray:
    """A digit written with a broad pen or marker, or a scan of a few pixels enlarged, has
    strokes wider than MNIST's: they lose a pixel at a time (each pixel keeps the least ink
    of its 2 x 2, paper beyond the edges). The thinner digit stays where it is in its box:
    fitting it to the box again was no better on other writers' digits."""
    for _ in range(MAX_THINNING):
        if stroke_width(crop) <= MAX_STROKE:
            break
        crop = cv2.erode(
            crop, _TWO_BY_TWO, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=0
        )
    return crop
