"""Reading an image: bounded in bytes and pixels, decoded only by the decoders of the formats
`predict` documents, upright by its EXIF orientation, as grey and alpha in [0, 1]; and the
one rule for finding image files in a folder."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

from cnnmnist.errors import CnnmnistError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
# Pillow's decoders for those formats, and no others: Pillow knows dozens, some of which run
# external programs (EPS runs Ghostscript) or decode a whole file before its size is known
# (ICO). An allow-list, so a format added to Pillow later is not decoded either.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, TIFF, WebP, PGM/PPM"
MAX_PIXELS = 50_000_000  # refuse decompression bombs before decoding (a 7000 x 7000 photo is fine)
MAX_BYTES = 64 * 2**20  # an image file (or stdin) larger than this is refused while reading
# Larger images are scaled down right after decoding: the digit ends up 20 px tall, and
# float arrays of a full-size photo would take gigabytes.
MAX_SIDE = 1024
STDIN = "-"


class ImageError(CnnmnistError):
    """An input that cannot be read, decoded or turned into a digit."""


def image_files(folder: Path) -> tuple[list[Path], int]:
    """The image files under `folder` (by suffix), in every subfolder, sorted; hidden files
    and folders (names starting with '.') are left out. Also how many other files there are."""
    found, others = [], 0
    for path in sorted(Path(folder).rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
            else:
                others += 1
    return found, others


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
    side: grey in [0, 1], alpha in [0, 1] (or None), and notes (Pillow's own warnings
    among them, in words, never on stderr)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not blob:
        raise ImageError(f"{name}: empty file (0 bytes)")
    notes = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = _opened(Image, blob, name, notes)
            image.draft(image.mode, (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale
            image.load()
            # Phones store photos sideways and say so only in the EXIF Orientation tag.
            image = ImageOps.exif_transpose(image)
            if max(image.size) > MAX_SIDE:
                if image.mode == "P":
                    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
            grey, alpha = _grey_and_alpha(image)
        notes += sorted({f"the image file is unusual: {w.message}" for w in caught})
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name}: too many pixels for an image of a digit; refusing to decode it"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in a format read here ({FORMAT_NAMES})") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as e:
        raise ImageError(f"{name}: cannot decode the image: {_first_line(e)}") from None
    return grey, alpha, notes


def _opened(Image, blob: bytes, name: str, notes: list[str]):  # noqa: N803 - PIL.Image
    """The image opened by one of FORMATS' decoders, its size checked before decoding."""
    image = Image.open(io.BytesIO(blob), formats=FORMATS)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: declares {width}x{height} pixels, more than the {MAX_PIXELS:,} allowed; "
            "refusing to decode it (a decompression bomb?)"
        )
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"animated image with {image.n_frames} frames: used the first")
        image.seek(0)
    return image


def _first_line(error: BaseException) -> str:
    """An error's message, its first line and at most 200 characters."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


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
