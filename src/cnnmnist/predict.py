"""Image files -> MNIST-style 28x28 pixels -> predictions (no TensorFlow on the fast path)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import checkpoint, serving
from cnnmnist.errors import CnnmnistError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
MAX_PIXELS = 50_000_000  # refuse decompression bombs before decoding (a 7000 x 7000 photo is fine)
MAX_BYTES = 64 * 2**20  # an image file (or stdin) larger than this is refused while reading
# Larger images are scaled down right after decoding: the digit ends up 20 px tall, and
# float arrays of a full-size photo would take gigabytes.
MAX_SIDE = 1024
INK_FLOOR = 0.02  # ink below this (after background removal) is noise, not stroke
MIN_SIDE_FOR_LIGHTING = 32  # pixels: below this, the paper is taken as evenly lit
MIN_SPECKS = 3  # fewer isolated pixels on clean paper are the digit's own (MNIST has some)
MAX_NOISE_FLOOR = 0.35  # noise never removes more than the faintest third of the strokes
MIN_CONTRAST = 0.1  # less contrast than this between paper and darkest stroke: no ink
MIN_SIDE_FOR_RULES = 64  # pixels: in a smaller image a blurred digit's halo can look like a line
MAX_RULE_SLOPE = 0.05  # ruled lines turned by up to 3 degrees (a photo taken askew)
RULE_COVER = 0.9  # a ruled line has ink across this share of the image ...
RULE_MARGIN = 0.05  # ... and at both ends; it passes the rest of the ink by this share on each side
RULE_FRINGE = 0.3  # a row beside a line with this share of ink is its blurred edge
TOUCH = 2  # rows beside a line near an edge that a stroke joining it (a foot, a bar) fills
RULE_TRIM = 0.005  # the share of the digit's pixels at each end of its extent taken as strays
MAX_RULE_LEVEL = 0.15  # lines are traced at this ink level at most, however noisy the paper
LINE_STEP = 0.05  # a side of the border this much darker than the paper just inside: a line
HALF_INK_BORDER = 0.25  # a border median this near the middle of the image's range: half ink
ONE_SURFACE = 0.05  # ... unless a surface of light fits the border this closely (of the range)
BOX = 20  # MNIST digits fit a 20 x 20 box ...
UPSCALE_CURVE = (0.3, 0.7)  # ink levels mapped to 0 and 1 when a small digit is enlarged
MAX_STROKE = 4.5  # px in the 20-px box: about 1% of MNIST's digits have wider strokes (measured)
MAX_THINNING = 3  # pixels a stroke too wide loses at most, one at a time
CENTRE = 14.0  # ... placed with their centre of mass at pixel (14, 14) of 28 x 28 (measured)
LOW_CONFIDENCE = 0.5
BLANK = "no ink found: the image looks blank"
STDIN = "-"


class ImageError(CnnmnistError):
    """An input that cannot be read, decoded or turned into a digit."""


@dataclass
class Prepared:
    """One input after preprocessing: the 28x28 pixels the model sees, or why there are none."""

    source: str
    pixels: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files stay, directories become their image files (sorted), '-' means stdin."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if item != STDIN and path.is_dir():
            out.extend(
                str(p)
                for p in sorted(path.iterdir())
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            out.append(item)
    return out


def read_bounded(stream, name: str, limit: int = MAX_BYTES) -> bytes:
    """Read a file object to its end, refusing more than `limit` bytes (checked while
    reading, in chunks, so /dev/zero fails fast and Ctrl-C is honoured)."""
    data = bytearray()
    while chunk := stream.read(1 << 20):
        data += chunk
        if len(data) > limit:
            raise ImageError(f"{name}: larger than {limit >> 20} MiB, refusing to read it all")
    return bytes(data)


def read_file(source: str) -> bytes:
    """The bytes of an image file, bounded by MAX_BYTES."""
    try:
        with open(source, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_BYTES:  # a regular file says so at once
                raise ImageError(f"{source}: larger than {MAX_BYTES >> 20} MiB, not read")
            return read_bounded(f, source)
    except OSError as e:
        raise ImageError(f"{source}: cannot read: {e.strerror or e}") from None


def decode(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Decode image bytes, upright by their EXIF orientation and at most MAX_SIDE pixels on a
    side: grey in [0, 1], alpha in [0, 1] (or None), and notes."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not blob:
        raise ImageError(f"{name}: empty file (0 bytes)")
    notes = []
    try:
        image = Image.open(io.BytesIO(blob))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageError(
                f"{name}: declares {width}x{height} pixels, more than the {MAX_PIXELS:,} allowed; "
                "refusing to decode it (a decompression bomb?)"
            )
        if getattr(image, "n_frames", 1) > 1:
            notes.append(f"animated image with {image.n_frames} frames: used the first")
            image.seek(0)
        image.draft(image.mode, (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale
        image.load()
        # Phones store photos sideways and say so only in the EXIF Orientation tag.
        image = ImageOps.exif_transpose(image)
        if max(image.size) > MAX_SIDE:
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
        grey, alpha = _grey_and_alpha(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refusing to decode it (a decompression bomb?): {e}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP)"
        ) from None
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise ImageError(f"{name}: cannot decode image: {e}") from None
    return grey, alpha, notes


def _grey_and_alpha(image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = image.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit grey or float
        grey = np.asarray(image, dtype=np.float64)
        if not np.isfinite(grey).all():  # a float TIFF can hold them; they would reach the maths
            raise ValueError("it holds pixels that are not finite numbers (NaN or infinity)")
        top = 65535.0 if mode.startswith("I;16") or grey.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(1.0, float(grey.max(initial=0)))
        return np.clip(grey / top, 0, 1), None
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64) / 255
        grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
        return grey, rgba[..., 3]
    return np.asarray(image.convert("L"), dtype=np.float64) / 255, None


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def _median(values: np.ndarray) -> float:
    """The median of a non-empty array. np.median's first call imports numpy.ma, a cost that
    every `predict` would pay at start-up."""
    return float(_row_medians(np.ravel(values)[None, :])[0])


def _row_medians(rows: np.ndarray) -> np.ndarray:
    """The median of each row of a 2-D array (see `_median`)."""
    middle = rows.shape[1] // 2
    if rows.shape[1] % 2:
        return np.partition(rows, middle, axis=1)[:, middle]
    part = np.partition(rows, (middle - 1, middle), axis=1)
    return (part[:, middle - 1] + part[:, middle]) / 2


def ink_map(grey: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """Ink in [0, 1] (1 = stroke), whatever the polarity: light paper is inverted, the paper's
    own level is subtracted, and transparent pixels count as background."""
    grey = np.asarray(grey, dtype=np.float64)
    if grey.ndim != 2 or grey.size == 0 or not np.isfinite(grey).all():
        raise ImageError(f"expected a finite 2-D grey image, got shape {grey.shape}")
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
        return np.zeros_like(ink)
    ink = np.clip(ink / contrast, 0, 1)
    # Paper grain and sensor noise: anything within 5 sigma of the paper level is not ink,
    # and isolated specks must not stretch the digit's box. Clean images skip both (the median
    # would wear down a thin stroke), unless specks show on paper that is otherwise clean
    # (salt noise, dust: too sparse to move the border's median). The cap keeps strokes when
    # the border itself is mostly ink (a digit cropped tight).
    sigma /= contrast
    ink = without_rules(ink, max(INK_FLOOR, min(3 * sigma, MAX_RULE_LEVEL)))
    if sigma > 0 or _specks(ink > INK_FLOOR) >= MIN_SPECKS:
        ink = _despeckle(np.where(ink > min(max(5 * sigma, INK_FLOOR), MAX_NOISE_FLOOR), ink, 0.0))
    return _without_slivers(ink, INK_FLOOR)


def _rules(ink: np.ndarray, level: float) -> list[tuple[int, int, np.ndarray, int]]:
    """Ruled lines along the rows, as (top, bottom, shift, edge): row r + shift[x] of column x
    for r from top to bottom; edge -1 or 1 when the line comes within RULE_MARGIN of the top
    or bottom edge, else 0. A line has ink above `level` across the image, within
    MAX_RULE_SLOPE of horizontal (one turned off the top or bottom edge: across the part
    inside, at least half the width), runs off it at both ends, and is at most a fortieth of
    the image thick."""
    height, width = ink.shape
    if min(height, width) < MIN_SIDE_FOR_RULES:
        return []
    sample = np.arange(0, width, max(1, width // 64))  # enough columns to see a line
    columns = ink[:, sample] > level
    if columns.any(axis=0).mean() < RULE_COVER:
        return []  # most images: no row can have ink in enough of these columns

    def pooled(reach):  # each row counts the ink of `reach` rows on either side too
        out = columns.copy()
        for step in range(1, reach + 1):
            out[step:] |= columns[:-step]
            out[:-step] |= columns[step:]
        return out

    def shift(slope, cols):
        return np.round(slope * (cols - width / 2)).astype(int)

    pad = int(MAX_RULE_SLOPE * width / 2) + 1  # rows of lines that leave the image turned

    def cover(slope, ink_in):
        rows = np.arange(-pad, height + pad)[:, None] + shift(slope, sample)
        valid = (rows >= 0) & (rows < height)
        on = valid & ink_in[np.clip(rows, 0, height - 1), np.arange(sample.size)]
        return valid, on, on.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)

    def best(slopes, ink_in):  # the slope that lines the ink up best: the sharpest profile
        slopes = np.clip(slopes, -MAX_RULE_SLOPE, MAX_RULE_SLOPE)
        return max(slopes, key=lambda s: (np.square(cover(s, ink_in)[2]).sum(), -abs(s)))

    # Coarse to fine: slopes 8 / width apart, with rows counting 3 neighbours each side (the
    # nearest is at most 4 / width off, which moves a line's ends by 2 rows), then 1 / width
    # apart around the best, with 1 neighbour (a line a pixel thin, between two slopes, still
    # fills one row).
    unit = 1 / width
    slope = best(np.arange(-MAX_RULE_SLOPE, MAX_RULE_SLOPE + unit, 8 * unit), pooled(3))
    mask = pooled(1)
    slope = best(slope + unit * np.arange(-4, 5), mask)
    valid, on, share = cover(slope, mask)
    hits = np.flatnonzero(share >= RULE_COVER)
    end = max(1, round(RULE_MARGIN * sample.size))
    offsets, near = shift(slope, np.arange(width)), RULE_MARGIN * height
    lines = []
    # Rows a few apart are one band: a digit's thick bar, turned, is not two thin lines.
    for band in np.split(hits, np.flatnonzero(np.diff(hits) > 3) + 1) if hits.size else []:
        top, bottom = int(band[0]), int(band[-1])
        inside = valid[top : bottom + 1].any(axis=0)
        if inside.mean() < 0.5 or bottom - top - 1 > _rule_width(height):
            continue
        reaches = on[top : bottom + 1].any(axis=0)[inside]
        if reaches[:end].mean() < 0.5 or reaches[-end:].mean() < 0.5:
            continue
        # The band has a row on each side of the line; one more where the next row is mostly
        # ink: the line's blurred edge.
        top -= int(top > 0 and share[top - 1] >= RULE_FRINGE)
        bottom += int(bottom < share.size - 1 and share[bottom + 1] >= RULE_FRINGE)
        top, bottom = top - pad, bottom - pad
        edge = -1 if top + offsets.min() <= near else int(bottom + offsets.max() >= height - near)
        lines.append((top, bottom, offsets, edge))
    return lines


def _rule_width(size: int) -> int:
    """The most rows a ruled line may be thick in an image `size` rows high (a fortieth)."""
    return max(2, size // 40)


def _inner_depth(shape: tuple[int, int]) -> int:
    """How deep inside the border the paper is looked for where a page's lines may run along
    the edges: two lines' widths."""
    return 2 * _rule_width(min(shape))


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
    found = [(False, line) for line in _rules(ink, level)]
    found += [(True, line) for line in _rules(ink.T, level)]
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


def _without_slivers(ink: np.ndarray, level: float) -> np.ndarray:
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
            thick = _rule_width(rows.shape[0]) + 1
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


def _light_paper(grey: np.ndarray) -> bool:
    """Whether the paper is lighter than the ink. The border's median says, unless it lies
    near the middle of the image's range: a bold digit cropped to its ink has strokes along
    half its border. Then three quarters of the border on one side of the middle decide,
    or a surface of light that fits it, or else the four corners (strokes reach the sides of
    a digit's box more often than its corners)."""
    edge = _border(grey)
    border = _median(edge)
    low, high = float(grey.min()), float(grey.max())
    middle = (low + high) / 2
    if abs(border - middle) >= HALF_INK_BORDER * (high - low):
        return border > 0.5
    # Three quarters of the border on one side is paper with a few lines or marks on it (a page
    # in dim light), not a digit's strokes along half of it. In a large image the band a few
    # lines' widths deep is counted: a photo may be cropped along a page's lines.
    if min(grey.shape) >= MIN_SIDE_FOR_RULES:
        depth = _inner_depth(grey.shape)
        band = np.ones(grey.shape, bool)
        band[depth:-depth, depth:-depth] = False
        edge = grey[band]
    quarter = edge.size // 4
    low_q, high_q = np.partition(edge, (quarter, edge.size - 1 - quarter))[[quarter, -1 - quarter]]
    if low_q > middle or high_q < middle:
        return bool(low_q > middle)
    if _one_surface(grey, high - low):  # no ink on the border, only uneven light
        return border > middle
    return _median(grey[[0, 0, -1, -1], [0, -1, 0, -1]]) > middle


PLANE, BOWL = 3, 6  # terms of a surface of light


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
        sigma = 1.4826 * _median(np.abs(residual[keep]))
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
        median = _median(border)
        sigma = 1.4826 * _median(np.abs(border - median))
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
    reach = _inner_depth(ink.shape) + 1
    depths = []
    for side in (ink, ink[::-1], ink.T, ink.T[::-1]):  # top, bottom, left, right
        medians = _row_medians(side[:reach])
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
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 1), (3, 3))
    return int((mask & (windows.sum(axis=(2, 3)) == 1)).sum())


def _despeckle(ink: np.ndarray) -> np.ndarray:
    """A 3x3 median: isolated specks (dust, JPEG noise) must not stretch the digit's box."""
    from PIL import Image, ImageFilter

    if min(ink.shape) < 3:
        return ink
    image = Image.fromarray(ink.astype(np.float32), mode="F")
    return np.asarray(image.filter(ImageFilter.MedianFilter(3)))


def to_mnist(ink: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """MNIST's own normalisation: crop to the ink, fit the longer side to 20 px (area-averaged),
    centre the centre of mass in 28 x 28. Returns uint8 pixels and warnings."""
    from PIL import Image

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
    crop = np.where(mask, ink, 0.0)[top:bottom, left:right].astype(np.float32)
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        # Area-average when shrinking; when enlarging, Lanczos, which blurs less than bilinear.
        resample = Image.BOX if scale < 1 else Image.LANCZOS
        crop = np.asarray(Image.fromarray(crop, mode="F").resize(size, resample=resample))
        if scale > 1:
            # Enlarging a digit of a few pixels smears each into a ramp; MNIST's digits were
            # written large and have steep edges. A contrast curve restores them (measured on
            # 8x8 scans by other writers: benchmarks/robustness.py); it also clips Lanczos's
            # ringing.
            crop = np.clip((crop - UPSCALE_CURVE[0]) / (UPSCALE_CURVE[1] - UPSCALE_CURVE[0]), 0, 1)
    crop = _thin(crop)
    if not crop.any():  # faint specks the contrast curve took for the ink's blurred edge
        return np.zeros((28, 28), np.uint8), [*warnings, BLANK]
    h, w = crop.shape
    canvas = np.zeros((28, 28), np.float64)
    y0, x0 = (28 - h) // 2, (28 - w) // 2
    canvas[y0 : y0 + h, x0 : x0 + w] = crop
    mass = canvas.sum()
    ys, xs = np.mgrid[:28, :28]
    dy = round(CENTRE - (canvas * ys).sum() / mass)
    dx = round(CENTRE - (canvas * xs).sum() / mass)
    dy = min(max(dy, -y0), 28 - h - y0)  # never push ink off the canvas
    dx = min(max(dx, -x0), 28 - w - x0)
    out = np.zeros((28, 28), np.float64)
    out[y0 + dy : y0 + dy + h, x0 + dx : x0 + dx + w] = crop
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8), warnings


def stroke_width(ink: np.ndarray) -> float:
    """The strokes' mean width in pixels: twice the ink's area over the length of its outline
    (a stroke w wide and L long has area wL and an outline about 2L long). The outline is
    the summed change between neighbouring pixels, so grey edges count in proportion; pi/4
    turns the two axes' sums into a length whatever the edges' direction."""
    edges = np.pad(ink, 1)
    outline = np.abs(np.diff(edges, axis=0)).sum() + np.abs(np.diff(edges, axis=1)).sum()
    return float(2 * ink.sum() / (outline * np.pi / 4)) if outline else 0.0


def _thin(crop: np.ndarray) -> np.ndarray:
    """A digit written with a broad pen or marker, or a scan of a few pixels enlarged, has
    strokes wider than MNIST's: they lose a pixel at a time (each pixel keeps the least ink
    of its 2 x 2). The thinner digit stays where it is in its box: fitting it to the box
    again was no better on other writers' digits (docs/robustness.md)."""
    for _ in range(MAX_THINNING):
        if stroke_width(crop) <= MAX_STROKE:
            break
        edges = np.pad(crop, ((0, 1), (0, 1)))
        crop = np.minimum.reduce([edges[:-1, :-1], edges[1:, :-1], edges[:-1, 1:], edges[1:, 1:]])
    return crop


def prepare(source: str, blob: bytes | None = None) -> Prepared:
    """Read, decode and normalise one input; failures are recorded, never raised."""
    try:
        if blob is None:
            blob = read_file(source)
        grey, alpha, notes = decode(blob, source)
        pixels, warnings = to_mnist(ink_map(grey, alpha))
        return Prepared(source, pixels, notes + warnings)
    except ImageError as e:
        return Prepared(source, error=str(e))


def predict(
    inputs: list[str],
    model_dir: Path,
    top_k: int = 3,
    stdin: bytes | None = None,
    on_warning=lambda warning: None,
) -> list[dict[str, Any]]:
    """Predict every input in one batched model call; one result per input, in input order.
    Warnings about the model (not one image) go to on_warning."""
    sources = expand_inputs(inputs)
    if not sources:
        raise ImageError(
            f"no images found in {', '.join(inputs)} "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    model = serving.engine(checkpoint.read(model_dir), on_warning)  # fails before decoding
    prepared = [prepare(source, stdin if source == STDIN else None) for source in sources]
    ready = [p for p in prepared if has_ink(p)]
    probs = model.probabilities(np.stack([p.pixels for p in ready])) if ready else np.zeros((0, 10))
    by_id = {id(p): row for p, row in zip(ready, probs, strict=True)}
    return [result(p, by_id.get(id(p)), model.name, top_k) for p in prepared]


def result(prepared: Prepared, row: np.ndarray | None, engine: str, top_k: int = 3):
    """One input's answer, as `predict --json` prints it (plus the pixels the model saw), from
    its preprocessing and its probabilities (None: nothing to predict)."""
    out: dict[str, Any] = {
        "file": "<stdin>" if prepared.source == STDIN else prepared.source,
        "digit": None,
        "confidence": None,
        "probabilities": None,
        "top": [],
        "warnings": list(prepared.warnings),
        "error": prepared.error,
        "engine": engine,
        "pixels": prepared.pixels,  # what the model saw (for --show; not part of --json)
    }
    if row is not None:
        order = np.argsort(-row, kind="stable")
        out.update(
            digit=int(order[0]),
            confidence=float(row[order[0]]),
            probabilities=[float(v) for v in row],
            top=[{"digit": int(k), "probability": float(row[k])} for k in order[:top_k]],
        )
        if row[order[0]] < LOW_CONFIDENCE:
            out["warnings"].append(f"low confidence ({row[order[0]]:.0%})")
    return out


def has_ink(prepared: Prepared) -> bool:
    """Whether there is a digit to predict (a blank image is answered with no digit)."""
    return prepared.pixels is not None and bool(prepared.pixels.any())


def prepare_pixels(images: np.ndarray) -> np.ndarray:
    """Grey uint8 images [N, H, W] (already decoded) through the same preprocessing."""
    return np.stack([to_mnist(ink_map(image / 255.0))[0] for image in images])


def mean_abs_change(images: np.ndarray) -> float:
    """How far preprocessing moves MNIST digits (0 = identity), in grey levels per pixel."""
    return float(np.abs(prepare_pixels(images).astype(float) - images.astype(float)).mean())
