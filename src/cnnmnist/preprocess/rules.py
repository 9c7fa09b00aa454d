"""Ruled and squared paper: finding the page's lines and taking them out of the ink, so that
they do not stretch the digit's box to the whole page (numpy, OpenCV's dilation).

A line runs across the image within MAX_RULE_SLOPE of the rows (or the columns), past the
rest of the ink on both sides, and is at most a fortieth of the image thick. A digit's own
bar ends with the digit, and a digit cropped tight has its bars and feet at the edges: a
candidate line that fails those tests is the digit's and stays.
"""

from __future__ import annotations

import cv2
import numpy as np

MIN_SIDE_FOR_RULES = 64  # pixels: in a smaller image a blurred digit's halo can look like a line
MAX_RULE_SLOPE = 0.05  # ruled lines turned by up to 3 degrees (a photo taken askew)
RULE_COVER = 0.9  # a ruled line has ink across this share of the image ...
RULE_MARGIN = 0.05  # ... and at both ends; it passes the rest of the ink by this share on each side
RULE_FRINGE = 0.3  # a row beside a line with this share of ink is its blurred edge
TOUCH = 2  # rows beside a line near an edge that a stroke joining it (a foot, a bar) fills
RULE_TRIM = 0.005  # the share of the digit's pixels at each end of its extent taken as strays
MAX_RULE_LEVEL = 0.15  # lines are traced at this ink level at most, however noisy the paper
TRACE_NOISE = 3  # ... and at least this many times the paper's noise above it


def trace_level(noise: float, floor: float) -> float:
    """The ink level lines are traced at, on paper with this much noise (both as shares of
    the ink's range): above the noise, never above MAX_RULE_LEVEL."""
    return max(floor, min(TRACE_NOISE * noise, MAX_RULE_LEVEL))


class _Columns:
    """Ink above a level in a sample of an image's columns (enough to see a line), and how a
    line at a slope lines it up."""

    def __init__(self, ink: np.ndarray, level: float) -> None:
        self.height, self.width = ink.shape
        self.sample = np.arange(0, self.width, max(1, self.width // 64))
        self.ink = ink[:, self.sample] > level
        self.pad = int(MAX_RULE_SLOPE * self.width / 2) + 1  # rows of lines that leave turned

    def pooled(self, reach: int) -> np.ndarray:
        """Each row counting the ink of `reach` rows on either side too."""
        window = np.ones((2 * reach + 1, 1), np.uint8)
        return cv2.dilate(self.ink.view(np.uint8), window, borderType=cv2.BORDER_CONSTANT) > 0

    def shift(self, slope: float, cols: np.ndarray) -> np.ndarray:
        """The rows a line at `slope` climbs at columns `cols`, from the middle."""
        return np.round(slope * (cols - self.width / 2)).astype(int)

    def cover(self, slope: float, ink: np.ndarray):
        """For each row (padded) a line at `slope` may start at: which sampled columns it is
        inside the image at, which of them hold ink, and the share that do."""
        rows = np.arange(-self.pad, self.height + self.pad)[:, None] + self.shift(
            slope, self.sample
        )
        valid = (rows >= 0) & (rows < self.height)
        on = valid & ink[np.clip(rows, 0, self.height - 1), np.arange(self.sample.size)]
        return valid, on, on.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)

    def best(self, slopes: np.ndarray, ink: np.ndarray) -> float:
        """The slope that lines the ink up best: the sharpest profile."""
        slopes = np.clip(slopes, -MAX_RULE_SLOPE, MAX_RULE_SLOPE)
        return max(slopes, key=lambda s: (np.square(self.cover(s, ink)[2]).sum(), -abs(s)))


def _lines(ink: np.ndarray, level: float) -> list[tuple[int, int, np.ndarray, int]]:
    """Ruled lines along the rows, as (top, bottom, shift, edge): row r + shift[x] of column x
    for r from top to bottom; edge -1 or 1 when the line comes within RULE_MARGIN of the top
    or bottom edge, else 0. A line has ink above `level` across the image, within
    MAX_RULE_SLOPE of horizontal (one turned off the top or bottom edge: across the part
    inside, at least half the width), runs off it at both ends, and is at most a fortieth of
    the image thick."""
    if min(ink.shape) < MIN_SIDE_FOR_RULES:
        return []
    columns = _Columns(ink, level)
    if columns.ink.any(axis=0).mean() < RULE_COVER:
        return []  # most images: no row can have ink in enough of these columns
    # Coarse to fine: slopes 8 / width apart, with rows counting 3 neighbours each side (the
    # nearest is at most 4 / width off, which moves a line's ends by 2 rows), then 1 / width
    # apart around the best, with 1 neighbour (a line a pixel thin, between two slopes, still
    # fills one row).
    unit = 1 / columns.width
    slope = columns.best(
        np.arange(-MAX_RULE_SLOPE, MAX_RULE_SLOPE + unit, 8 * unit), columns.pooled(3)
    )
    mask = columns.pooled(1)
    slope = columns.best(slope + unit * np.arange(-4, 5), mask)
    return _bands(columns, slope, *columns.cover(slope, mask))


def _bands(columns: _Columns, slope: float, valid, on, share) -> list:
    """The lines among the rows a line at `slope` covers (see `_lines`)."""
    height = columns.height
    hits = np.flatnonzero(share >= RULE_COVER)
    end = max(1, round(RULE_MARGIN * columns.sample.size))
    offsets, near = columns.shift(slope, np.arange(columns.width)), RULE_MARGIN * height
    lines = []
    # Rows a few apart are one band: a digit's thick bar, turned, is not two thin lines.
    for band in np.split(hits, np.flatnonzero(np.diff(hits) > 3) + 1) if hits.size else []:
        top, bottom = int(band[0]), int(band[-1])
        inside = valid[top : bottom + 1].any(axis=0)
        if inside.mean() < 0.5 or bottom - top - 1 > rule_width(height):
            continue
        reaches = on[top : bottom + 1].any(axis=0)[inside]
        if reaches[:end].mean() < 0.5 or reaches[-end:].mean() < 0.5:
            continue
        # The band has a row on each side of the line; one more where the next row is mostly
        # ink: the line's blurred edge.
        top -= int(top > 0 and share[top - 1] >= RULE_FRINGE)
        bottom += int(bottom < share.size - 1 and share[bottom + 1] >= RULE_FRINGE)
        top, bottom = top - columns.pad, bottom - columns.pad
        edge = -1 if top + offsets.min() <= near else int(bottom + offsets.max() >= height - near)
        lines.append((top, bottom, offsets, edge))
    return lines


def rule_width(size: int) -> int:
    """The most rows a ruled line may be thick in an image `size` rows high (a fortieth)."""
    return max(2, size // 40)


def inner_depth(shape: tuple[int, int]) -> int:
    """How deep inside the border the paper is looked for where a page's lines may run along
    the edges: two lines' widths."""
    return 2 * rule_width(min(shape))


def _along(top: int, shift: np.ndarray, offsets, shape: tuple[int, int]):
    """(rows, cols) of the rows `offsets` from a ruled line's top, following its slope; and
    for each, whether it is inside the image."""
    ys = top + np.asarray(offsets)[:, None] + shift[None, :]
    xs = np.broadcast_to(np.arange(shape[1]), ys.shape)
    return ys, xs, (ys >= 0) & (ys < shape[0])


def without_rules(ink: np.ndarray, level: float) -> np.ndarray:
    """Ink without the lines of ruled or squared paper, which would stretch the digit's box to
    the whole page. A line must pass the rest of the ink on both sides, and one near an edge
    of the image must keep clear of it: a digit's own bar ends with the digit, and a digit
    cropped tight has its bars and feet at the edges. A line that fails is the digit's, and
    the others are judged again against the digit with it. Where a stroke crosses a line,
    its pixels stay."""
    found = [(False, line) for line in _lines(ink, level)]
    found += [(True, line) for line in _lines(ink.T, level)]
    while found:
        lines = np.zeros(ink.shape, bool)
        for turned, (top, bottom, shift, _) in found:
            view = lines.T if turned else lines
            ys, xs, inside = _along(top, shift, range(bottom - top + 1), view.shape)
            view[ys[inside], xs[inside]] = True
        digit = (ink > level) & ~lines
        strokes = _peeled((ink > 0.5) & digit)  # clear of paper grain and lines' ends
        where = np.nonzero(strokes)
        if not where[0].size:
            return ink
        # The digit's extent on each axis, as a share of the image, without the few stray
        # pixels (JPEG noise, a line's leftover) that would stretch it to the edges.
        trim = int(RULE_TRIM * where[0].size)
        extent = [
            np.sort(at)[[trim, -1 - trim]] / n for at, n in zip(where, ink.shape, strict=True)
        ]
        kept = [(turned, line) for turned, line in found if _clear(line, extent, turned, strokes)]
        if len(kept) == len(found):
            break
        found = kept
    if not found:
        return ink
    out = ink.copy()
    for turned, (top, bottom, shift, _) in found:
        view, own = (out.T, digit.T) if turned else (out, digit)
        thick = bottom - top + 1
        crossed = np.ones(view.shape[1], bool)  # columns where the digit's ink is on both sides
        for side in ((-2, -1), (thick, thick + 1)):
            ys, xs, inside = _along(top, shift, side, view.shape)
            crossed &= (inside & own[np.clip(ys, 0, view.shape[0] - 1), xs]).any(axis=0)
        ys, xs, inside = _along(top, shift, range(thick), view.shape)
        wipe = inside & ~crossed[None, :]
        view[ys[wipe], xs[wipe]] = 0.0
    return out


def without_slivers(ink: np.ndarray, level: float) -> np.ndarray:
    """Ink without slivers along its edges (`_peeled`), if the rest of the ink keeps
    RULE_MARGIN clear of every edge, as a digit in the middle of a page does (a digit cropped
    tight has its own bars there)."""
    if min(ink.shape) < MIN_SIDE_FOR_RULES:
        return ink
    mask = ink > level
    rest = _peeled(mask)
    if not rest.any() or np.array_equal(rest, mask):
        return ink
    for along, n in zip((rest.any(axis=1), rest.any(axis=0)), ink.shape, strict=True):
        at = np.flatnonzero(along)
        if at[0] < RULE_MARGIN * n or at[-1] >= (1 - RULE_MARGIN) * n:
            return ink
    return np.where(mask & ~rest, 0.0, ink)


def _peeled(mask: np.ndarray) -> np.ndarray:
    """The mask without slivers along its edges: what is left of a ruled line that leaves the
    image turned or runs along its edge, or of the page's edge. A sliver is at most a line's
    width thick (a turned line's fragment may climb MAX_RULE_SLOPE of the width more) and split
    from the rest by clear paper."""
    rest = mask.copy()
    found = True
    while found:
        found = False
        for turned, flip in ((False, False), (False, True), (True, False), (True, True)):
            view = rest.T if turned else rest
            rows = view[::-1] if flip else view
            if not rows[0].any():  # most images: no ink on the edge
                continue
            has = rows.any(axis=1)
            if has.all():
                continue
            gap = int(np.argmin(has))
            thick = rule_width(rows.shape[0]) + 1
            if (
                gap <= thick + MAX_RULE_SLOPE * rows.shape[1]
                and rows[:gap].sum(axis=0).max() <= thick
            ):
                rows[:gap] = False
                found = True
    return rest


def _clear(line, extent, turned: bool, strokes: np.ndarray) -> bool:
    """Whether a ruled line passes the digit (its extent on each axis, as shares of the
    image, and its strokes) on both sides and, near an edge, keeps clear of it or at least
    does not touch it: a digit cropped tight has its bars and feet there, joined to it."""
    top, bottom, shift, edge = line
    (low, high), (first, last) = extent[::-1] if turned else extent
    if first < RULE_MARGIN or last >= 1 - RULE_MARGIN:
        return False
    size = strokes.shape[1 if turned else 0]
    if not edge or (
        low >= (bottom + shift.max()) / size + RULE_MARGIN
        if edge < 0
        else high <= (top + shift.min()) / size - RULE_MARGIN
    ):
        return True
    # The rows just beyond the line on the digit's side, past the one its blur may reach: a
    # stroke that joins the line fills them; a few stray pixels do not.
    thick = bottom - top + 1
    offsets = range(-1 - TOUCH, -1) if edge > 0 else range(thick + 1, thick + 1 + TOUCH)
    view = strokes.T if turned else strokes
    ys, xs, inside = _along(top, shift, offsets, view.shape)
    return (inside & view[np.clip(ys, 0, view.shape[0] - 1), xs]).sum() < 2 * TOUCH
