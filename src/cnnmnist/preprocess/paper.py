"""Paper, light and noise: which way round ink and paper are, the paper's level under uneven
light (a plane or a bowl fitted to the border), and the specks of grain, dust and sensor noise
that must not stretch the digit's box (numpy and OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np

from cnnmnist.preprocess.rules import MIN_SIDE_FOR_RULES, inner_depth

INK_FLOOR = 0.02  # ink below this (after background removal) is noise, not stroke
MIN_SIDE_FOR_LIGHTING = 32  # pixels: below this, the paper is taken as evenly lit
MIN_SPECKS = 3  # fewer isolated pixels on clean paper are the digit's own (MNIST has some)
MAX_NOISE_FLOOR = 0.35  # noise never removes more than the faintest third of the strokes
NOISE_FLOOR = 5  # ... and everything within this many times the paper's noise of it goes
MIN_CONTRAST = 0.1  # less contrast than this between paper and darkest stroke: no ink
LINE_STEP = 0.05  # a side of the border this much darker than the paper just inside: a line
HALF_INK_BORDER = 0.25  # a border median this near the middle of the image's range: half ink
ONE_SURFACE = 0.05  # ... unless a surface of light fits the border this closely (of the range)
PLANE, BOWL = 3, 6  # terms of a surface of light


def ink_on_paper(grey: np.ndarray, alpha: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Ink in [0, 1] (1 = stroke), whatever the polarity: light paper is inverted, the
    paper's own level is subtracted and the contrast stretched to 1, and transparent pixels
    count as background; with the paper's noise, as a share of that contrast. No ink at all
    (contrast under MIN_CONTRAST): zeros."""
    if alpha is not None and (alpha < 0.5).any():
        opaque = alpha >= 0.5
        dark_strokes = opaque.any() and grey[opaque].mean() < 0.5
        ink = (1 - grey if dark_strokes else grey) * alpha
    else:
        ink = 1 - grey if _light_paper(grey) else grey
    paper, sigma = _paper(ink)
    ink = ink - paper
    contrast = ink.max(initial=0)
    if contrast < MIN_CONTRAST:
        return np.zeros_like(ink), 0.0
    return np.clip(ink / contrast, 0, 1), sigma / contrast


def without_noise(ink: np.ndarray, sigma: float) -> np.ndarray:
    """Paper grain and sensor noise out: anything within NOISE_FLOOR sigma of the paper level
    is not ink, and isolated specks must not stretch the digit's box. Clean images skip both
    (the median would wear down a thin stroke), unless specks show on paper that is
    otherwise clean (salt noise, dust: too sparse to move the border's median). The cap
    keeps strokes when the border itself is mostly ink (a digit cropped tight)."""
    if sigma > 0 or _specks(ink > INK_FLOOR) >= MIN_SPECKS:
        floor = min(max(NOISE_FLOOR * sigma, INK_FLOOR), MAX_NOISE_FLOOR)
        return _despeckle(np.where(ink > floor, ink, 0.0))
    return ink


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def _light_paper(grey: np.ndarray) -> bool:
    """Whether the paper is lighter than the ink. The border's median says, unless it lies
    near the middle of the image's range: a bold digit cropped to its ink has strokes along
    half its border. Then three quarters of the border on one side of the middle decide,
    or a surface of light that fits it, or else the four corners (strokes reach the sides of
    a digit's box more often than its corners)."""
    edge = _border(grey)
    border = np.median(edge)
    low, high = float(grey.min()), float(grey.max())
    middle = (low + high) / 2
    if abs(border - middle) >= HALF_INK_BORDER * (high - low):
        return border > 0.5
    # Three quarters of the border on one side is paper with a few lines or marks on it (a page
    # in dim light), not a digit's strokes along half of it. In a large image the band a few
    # lines' widths deep is counted: a photo may be cropped along a page's lines.
    if min(grey.shape) >= MIN_SIDE_FOR_RULES:
        depth = inner_depth(grey.shape)
        band = np.ones(grey.shape, bool)
        band[depth:-depth, depth:-depth] = False
        edge = grey[band]
    quarter = edge.size // 4
    low_q, high_q = np.partition(edge, (quarter, edge.size - 1 - quarter))[[quarter, -1 - quarter]]
    if low_q > middle or high_q < middle:
        return bool(low_q > middle)
    if _one_surface(grey, high - low):  # no ink on the border, only uneven light
        return border > middle
    return np.median(grey[[0, 0, -1, -1], [0, -1, 0, -1]]) > middle


def _lighting(ys: np.ndarray, xs: np.ndarray, terms: int) -> list[np.ndarray]:
    """The terms of a surface of light at rows ys and columns xs (each from -0.5 to 0.5 across
    the image): a plane, and for a bowl (light falling off towards the corners, as through a
    phone's lens) the squares and the cross term too."""
    plane = [np.ones_like(ys), ys, xs]
    return plane + [ys * ys, xs * xs, ys * xs] if terms == BOWL else plane


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns from -0.5 to 0.5 across an image, as an open grid."""
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return ys / shape[0] - 0.5, xs / shape[1] - 0.5


def _fit_light(image: np.ndarray, terms: int, tight: bool = False, ring=_border):
    """A surface of light with `terms` terms fitted to the image's border (`ring` picks its
    pixels from an image), three times, each without the border pixels the last fit took
    for ink: its coefficients, the residuals' spread and the border's residuals. `tight`:
    the border is mostly ink, so the first refit keeps only the pixels under the surface."""
    along = np.stack(
        [ring(np.broadcast_to(t, image.shape)) for t in _lighting(*_grid(image.shape), terms)],
        axis=1,
    )
    values = ring(image)
    keep = np.ones(len(values), bool)
    for step in range(3):
        fit, *_ = np.linalg.lstsq(along[keep], values[keep], rcond=None)
        residual = values - along @ fit
        sigma = 1.4826 * np.median(np.abs(residual[keep]))
        # Never below rounding: a border of one grey level leaves residuals of 1e-17 or so,
        # all of which a clip at 0 would drop, leaving nothing to fit.
        clip = max(0.0 if tight and step == 0 else 3 * sigma, 1e-9)
        keep = residual <= clip  # ink is brighter than paper, never darker
    return fit, float(sigma), residual


def _one_surface(grey: np.ndarray, span: float) -> bool:
    """Whether the image's border is one surface under uneven light (a bowl fits nearly all
    of it closely), not paper and ink."""
    if min(grey.shape) < MIN_SIDE_FOR_LIGHTING:
        return False
    _, sigma, residual = _fit_light(grey, BOWL)
    return sigma < ONE_SURFACE * span and (np.abs(residual) <= 3 * sigma).mean() >= 0.8


def _paper(ink: np.ndarray) -> tuple[np.ndarray, float]:
    """The paper's level under the ink, and its noise, from the image's border."""
    paper, sigma = _border_level(ink)
    if 5 * sigma > MAX_NOISE_FLOOR * (ink - paper).max(initial=0):
        # "Noise" this large is ink along the border (a digit cropped tight, a blurred scan):
        # the middle of the border is stroke, so the paper is its lower envelope instead.
        paper = _border_level(ink, tight=True)[0]
    return paper, sigma


def _border_level(ink: np.ndarray, tight: bool = False) -> tuple[np.ndarray, float]:
    """A plane fitted to the image's border (light falls off across a photo), refitted
    without the border pixels that are ink, and the residuals' spread; a bowl instead where
    it fits the border with half the spread or less (corners darker than the middle). A
    small image (a scan of a few pixels) gets its border's median. `tight`: the border is
    mostly ink, so the first refit keeps only the pixels under the plane, and a small image
    gets its border's tenth percentile."""
    h, w = ink.shape
    if min(h, w) < MIN_SIDE_FOR_LIGHTING:
        border = _border(ink)
        median = np.median(border)
        sigma = 1.4826 * np.median(np.abs(border - median))
        level = np.partition(border, border.size // 10)[border.size // 10] if tight else median
        return np.full_like(ink, level), float(sigma)
    ring = _border if tight else _paper_ring(ink)
    fit, sigma, _ = _fit_light(ink, PLANE, tight, ring)
    if sigma > INK_FLOOR and not tight:
        # Light falling off towards the corners is no plane: a bowl may fit it better.
        bowl, bowl_sigma, _ = _fit_light(ink, BOWL, ring=ring)
        if bowl_sigma < sigma / 2:
            fit, sigma = bowl, bowl_sigma
    ys, xs = _grid(ink.shape)
    return sum(c * t for c, t in zip(fit, _lighting(ys, xs, len(fit)), strict=True)), sigma


def _paper_ring(ink: np.ndarray):
    """What `_fit_light` takes the paper's light from: the border, except that a side along
    which a page's line runs (a photo cropped along it) is taken from the row or column, up
    to two lines' widths deeper, with the least ink. A line along a side would tilt the
    surface towards it and hide the lines on the far side."""
    if min(ink.shape) < MIN_SIDE_FOR_RULES:
        return _border
    reach = inner_depth(ink.shape) + 1
    depths = []
    for side in (ink, ink[::-1], ink.T, ink.T[::-1]):  # top, bottom, left, right
        medians = np.median(side[:reach], axis=1)
        deepest = int(np.argmin(medians))
        depths.append(deepest if medians[0] - medians[deepest] > LINE_STEP else 0)
    if not any(depths):
        return _border
    top, bottom, left, right = depths

    def ring(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[top], a[-1 - bottom], a[:, left], a[:, -1 - right]])

    return ring


def _specks(mask: np.ndarray) -> int:
    """How many pixels of the mask have none of their 8 neighbours in it (alone in their 3x3)."""
    around = cv2.filter2D(
        mask.astype(np.uint8), -1, np.ones((3, 3)), borderType=cv2.BORDER_CONSTANT
    )
    return int((mask & (around == 1)).sum())


def _despeckle(ink: np.ndarray) -> np.ndarray:
    """A 3x3 median: isolated specks (dust, JPEG noise) must not stretch the digit's box."""
    if min(ink.shape) < 3:
        return ink
    return cv2.medianBlur(ink.astype(np.float32), 3)
