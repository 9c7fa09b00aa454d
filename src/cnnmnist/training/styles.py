"""Ways of writing and storing digits that MNIST lacks, drawn into its training images.

MNIST's writers were American. Much of the world starts a 1 with a flag from its top, and
some give it a foot; MNIST has few such 1s, and a network trained on it alone reads them as
4 or 7. A recipe can ask for a share of its training 1s to be redrawn that way.

Other scanned collections stored each digit stretched on both axes to fill a small square
box, binarised, and cut where it left the scanner's box. A recipe can ask for a share of
its training digits to be stored that way, then prepared as `predict` would prepare such a
file, so the network sees them as it will be shown them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cnnmnist.preprocess import ink_map, to_mnist

SIDE = 28  # MNIST's images are SIDE x SIDE
MIN_HEIGHT = 8  # rows of ink: a smaller 1 is left as it is
MAX_SLANT = 0.35  # columns per row (about 20 degrees): a 1 slanted more would look like a 7
FLAG_ANGLE = (35.0, 65.0)  # degrees below the horizontal: a 7's bar is level, a flag is not
FLAG_SPREAD = 25.0  # degrees at least between the flag and the stem
FLAG_LENGTH = (0.2, 0.4)  # of the 1's height, beyond the stem
FOOT_SHARE = 0.2  # of the flagged 1s, given a foot too
FOOT_HALF = (0.15, 0.3)  # of the 1's height, on each side of the stem
INK = 0.3  # a row with less ink than this (0..1 summed) is paper
BOX_SIDES = (16, 16, 12, 10)  # the squares the collections stretched their digits to fill
BOX_CUT = (0.08, 0.25)  # of the extent: what is lost where a digit left the scanner's box
BOX_THRESHOLDS = (0.3, 0.5, 0.7)  # ink levels the collections binarised at

_ROWS, _COLS = np.mgrid[:SIDE, :SIDE].astype(np.float64)
_INDEX = np.arange(SIDE, dtype=np.float64)


def stroke(start: np.ndarray, end: np.ndarray, width: float) -> np.ndarray:
    """The ink (0..1, edges antialiased) of a pen stroke `width` px wide from `start` to
    `end`, given as (row, column)."""
    d = end - start
    t = ((_ROWS - start[0]) * d[0] + (_COLS - start[1]) * d[1]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    distance = np.hypot(_ROWS - start[0] - t * d[0], _COLS - start[1] - t * d[1])
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)


def flagged_one(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A 1 (uint8, 28x28, white on black) with a flag drawn down to the left from its top,
    and now and then a foot across its end, moved so that its centre of mass keeps its
    column; None for a 1 too small or too slanted to flag."""
    x = image.astype(np.float64) / 255
    mass = x.sum(axis=1)
    rows = np.flatnonzero(mass > INK)
    if len(rows) < MIN_HEIGHT:
        return None
    centres = (x[rows] @ _INDEX) / mass[rows]
    axis = np.polyfit(rows, centres, 1, w=mass[rows])  # the stem's column at each row
    if abs(axis[0]) > MAX_SLANT:
        return None
    height = rows[-1] - rows[0] + 1
    stem = float(mass[rows].mean())  # ink per row: the stem's width
    width = min(max(stem, 1.5), 4.0)  # the flag's pen
    top = np.array([rows[0] + 1.0, np.polyval(axis, rows[0] + 1.0)])
    # Below the level, and clear of the stem: a 1 leaning right would swallow a steep flag.
    along_stem = np.degrees(np.arctan2(1.0, -axis[0]))  # the stem, down from its top
    angle = np.radians(rng.uniform(FLAG_ANGLE[0], min(FLAG_ANGLE[1], along_stem - FLAG_SPREAD)))
    length = stem / 2 + rng.uniform(*FLAG_LENGTH) * height  # from the stem's middle
    length = min(length, (top[1] - 1) / np.cos(angle))  # the tip on the image
    tip = top + length * np.array([np.sin(angle), -np.cos(angle)])
    out = np.maximum(x, stroke(top, tip, width))
    if rng.random() < FOOT_SHARE:
        end = np.array([rows[-1] - 1.0, np.polyval(axis, rows[-1] - 1.0)])
        across = np.array([axis[0], -1.0]) / np.hypot(axis[0], 1.0)  # square to the stem
        half = rng.uniform(*FOOT_HALF) * height * across
        out = np.maximum(out, stroke(*np.clip([end + half, end - half], 1, SIDE - 2), width))
    shift = round((x.sum(axis=0) @ _INDEX) / x.sum() - (out.sum(axis=0) @ _INDEX) / out.sum())
    return np.round(np.roll(out, shift, axis=1) * 255).astype(np.uint8)


def with_flagged_ones(
    images: np.ndarray, labels: np.ndarray, share: float, seed: int
) -> tuple[np.ndarray, int]:
    """The images with `share` of the 1s picked (by seed) and flagged where they can be (a
    copy: the arrays given are left alone), and how many were."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the seed's others stay as they were
    return _restyled(images, np.flatnonzero(labels == 1), share, flagged_one, rng)


def _restyled(images: np.ndarray, among: np.ndarray, share: float, style, rng) -> tuple:
    """A copy of the images with `share` of those at indices `among` picked (by rng) and
    redrawn by style(image, rng) where it can (None: left as it is); and how many were."""
    if not share:
        return images, 0
    picked = np.sort(rng.choice(among, round(len(among) * share), replace=False))
    out, redrawn = images.copy(), 0
    for i in picked:
        styled = style(images[i], rng)
        if styled is not None:
            out[i], redrawn = styled, redrawn + 1
    return out, redrawn


def box_scan(image: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A digit (uint8, 28x28, white on black) as a box-normalised collection stores it (cropped
    to its ink; half of the time cut at one or two sides by BOX_CUT of its extent; stretched
    on both axes to fill a square of BOX_SIDES pixels; binarised at one of BOX_THRESHOLDS),
    then prepared from that small black-on-white image as `predict` prepares a file. None if
    it has too little ink to crop."""
    ink = image.astype(np.float64) / 255
    rows, cols = np.flatnonzero(ink.max(axis=1) > 0.2), np.flatnonzero(ink.max(axis=0) > 0.2)
    if len(rows) < 4 or not len(cols):
        return None
    box = [rows[0], rows[-1] + 1, cols[0], cols[-1] + 1]  # top, bottom, left, right
    if rng.random() < 0.5:
        for side in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
            extent = box[1] - box[0] if side < 2 else box[3] - box[2]
            box[side] += (1 if side % 2 == 0 else -1) * int(rng.uniform(*BOX_CUT) * extent)
    top, bottom, left, right = box
    crop = Image.fromarray(np.round(ink[top:bottom, left:right] * 255).astype(np.uint8))
    side = int(rng.choice(BOX_SIDES))
    stretched = np.asarray(crop.resize((side, side), Image.Resampling.BILINEAR)) / 255
    binary = stretched > rng.choice(BOX_THRESHOLDS)
    return to_mnist(ink_map(1.0 - binary))[0]


def with_box_scans(
    images: np.ndarray, labels: np.ndarray, share: float, seed: int
) -> tuple[np.ndarray, int]:
    """The images with `share` of them (picked by seed, any digit) stored as box-normalised
    scans (`box_scan`), a copy; and how many were."""
    rng = np.random.default_rng([seed, 2])  # its own stream, as the flagged ones have theirs
    return _restyled(images, np.arange(len(images)), share, box_scan, rng)
