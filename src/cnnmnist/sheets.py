"""Sheets of digits drawn with Pillow (no extra needed): the 28x28 inputs the model saw, each
beside the user's original image when there is one, captioned; for `evaluate --errors` and
`predict --show FILE.png`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnmnist import files

COLUMNS = 6
SCALE = 3  # screen pixels per input pixel
CAPTION = 16  # pixels under each tile for its caption
SIDE = 28 * SCALE


@dataclass
class Tile:
    """One digit on a sheet: the 28x28 pixels the model saw, a caption, and the original
    image's file (or None)."""

    pixels: np.ndarray
    caption: str
    original: str | None = None


def size(count: int, originals: bool = False) -> tuple[int, int]:
    """Width and height in pixels of a sheet of `count` tiles (each twice as wide when the
    original image is drawn beside the 28x28 input)."""
    columns = min(max(count, 1), COLUMNS)
    rows = max(1, math.ceil(count / COLUMNS))
    return columns * SIDE * (2 if originals else 1), rows * (SIDE + CAPTION)


def write(tiles: list[Tile], path: Path) -> None:
    """Draw the tiles into a PNG at `path`, written atomically: dark ink on white, the
    original (when there is one) left of the input the model saw."""
    from PIL import Image, ImageDraw

    originals = any(t.original is not None for t in tiles)
    width = SIDE * (2 if originals else 1)
    sheet = Image.new("L", size(len(tiles), originals), color=255)
    draw = ImageDraw.Draw(sheet)
    for k, tile in enumerate(tiles):
        x, y = (k % COLUMNS) * width, (k // COLUMNS) * (SIDE + CAPTION)
        digit = Image.fromarray(255 - np.asarray(tile.pixels, np.uint8)).resize(
            (SIDE, SIDE), Image.Resampling.NEAREST
        )
        sheet.paste(digit, (x + width - SIDE, y))
        if tile.original is not None:
            sheet.paste(_original(tile.original), (x, y))
        draw.text((x + 4, y + SIDE + 2), tile.caption, fill=0)
    files.atomic_write(path, lambda f: sheet.save(f, format="PNG"))


def _original(source: str):
    """The user's image as decoded for `predict` (upright, grey), fitted into the tile."""
    from PIL import Image

    from cnnmnist.preprocess import decode, read_file

    grey, _, _ = decode(read_file(source), source)
    image = Image.fromarray(np.round(grey * 255).astype(np.uint8))
    image.thumbnail((SIDE, SIDE))
    tile = Image.new("L", (SIDE, SIDE), color=255)
    tile.paste(image, ((SIDE - image.width) // 2, (SIDE - image.height) // 2))
    return tile
