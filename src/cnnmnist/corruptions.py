"""Corrupted copies of MNIST-style digits, in the spirit of MNIST-C (Mu & Gilmer, 2019).

Each corruption maps uint8 images [N, 28, 28] (white ink on black) to new uint8 images of the
same shape, drawing its random choices from the generator it is given, so a fixed seed gives
the same images every time. Filters, warps and morphology are OpenCV's; resampling and
drawing are Pillow's.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

SEED = 20190605  # the suite is one fixed sample: every run corrupts the same way

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]
CORRUPTIONS: dict[str, Corruption] = {}


def corruption(name: str):
    def register(fn: Corruption) -> Corruption:
        CORRUPTIONS[name] = fn
        return fn

    return register


def apply(name: str, images: np.ndarray, seed: int = SEED) -> np.ndarray:
    """The corruption `name` of uint8 images [N, 28, 28], deterministic for a given seed."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    # Each corruption has its own stream, so adding one does not change the others.
    rng = np.random.default_rng([seed, *name.encode()])
    out = CORRUPTIONS[name](images.astype(np.float64), rng)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- helpers -------------------------------------------------------------------------------


def _filter(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every image with a small kernel, zeros outside (as the black background)."""
    kernel = np.asarray(kernel, np.float64)
    return np.stack(
        [cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_CONSTANT) for image in images]
    ).reshape(images.shape)


def _gaussian(sigma: float) -> np.ndarray:
    """A 2-D Gaussian kernel reaching 3 sigma each way."""
    g = cv2.getGaussianKernel(2 * max(1, int(np.ceil(3 * sigma))) + 1, sigma, cv2.CV_64F)
    return g @ g.T


def _warp(images: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Bilinear resampling: output pixel (y, x) reads the input at inverse @ (y-c, x-c, 1) + c,
    one 2x3 matrix per image (in (y, x) order), zeros outside."""
    c = np.array([13.5, 13.5])
    out = np.empty_like(images)
    for i, (image, matrix) in enumerate(zip(images, inverse, strict=True)):
        linear = matrix[:, :2][::-1, ::-1]  # (y, x) order -> OpenCV's (x, y)
        offset = matrix[::-1, 2] + c - linear @ c
        out[i] = cv2.warpAffine(
            image,
            np.concatenate([linear, offset[:, None]], axis=1),
            (28, 28),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    return out


def _affine(images: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Apply one 2x2 linear map per image [N, 2, 2] (in (y, x) order) about the centre."""
    inverse = np.linalg.inv(forward)
    return _warp(images, np.concatenate([inverse, np.zeros((len(images), 2, 1))], axis=2))


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=n)


def _draw(images: np.ndarray, rng: np.random.Generator, shape) -> np.ndarray:
    """Draw a random white mark on every image with Pillow; `shape(draw, rng)` draws one."""
    from PIL import Image, ImageDraw

    out = images.copy()
    for i in range(len(images)):
        mark = Image.new("L", (28, 28), 0)
        shape(ImageDraw.Draw(mark), rng)
        out[i] = np.maximum(out[i], np.asarray(mark, dtype=np.float64))
    return out


# --- noise ---------------------------------------------------------------------------------


@corruption("shot_noise")
def shot_noise(images, rng):
    """Photon (Poisson) noise, as from a dim sensor."""
    photons = 12.0
    return rng.poisson(images / 255 * photons) / photons * 255


@corruption("impulse_noise")
def impulse_noise(images, rng):
    """Salt and pepper: 10% of the pixels set to black or white."""
    hit = rng.random(images.shape) < 0.10
    return np.where(hit, rng.choice([0.0, 255.0], size=images.shape), images)


# --- blur ----------------------------------------------------------------------------------


@corruption("gaussian_blur")
def gaussian_blur(images, rng):
    """An out-of-focus camera."""
    return _filter(images, _gaussian(1.3)) * 1.6  # keep the strokes about as bright


@corruption("motion_blur")
def motion_blur(images, rng):
    """A shaking hand: a 7-pixel line kernel in one of eight directions."""
    angles = rng.integers(0, 8, size=len(images))
    out = np.empty_like(images)
    for a in range(8):
        chosen = angles == a
        theta = np.pi * a / 8
        kernel = np.zeros((7, 7))
        for t in np.linspace(-3, 3, 13):
            kernel[round(3 + t * np.sin(theta)), round(3 + t * np.cos(theta))] = 1
        out[chosen] = _filter(images[chosen], kernel / kernel.sum()) * 1.5
    return out


@corruption("glass_blur")
def glass_blur(images, rng):
    """Frosted glass: a slight blur, then every pixel read from a random neighbour."""
    blurred = _filter(images, _gaussian(0.7))
    n = len(images)
    ys, xs = np.mgrid[:28, :28]
    dy = rng.integers(-1, 2, size=(n, 28, 28))
    dx = rng.integers(-1, 2, size=(n, 28, 28))
    rows = np.arange(n)[:, None, None]
    return blurred[rows, np.clip(ys + dy, 0, 27), np.clip(xs + dx, 0, 27)]


# --- geometry ------------------------------------------------------------------------------


@corruption("shear")
def shear(images, rng):
    """Slanted writing: a horizontal shear of 0.4 to 0.6, left or right."""
    k = rng.uniform(0.4, 0.6, len(images)) * _signs(rng, len(images))
    forward = np.zeros((len(images), 2, 2))
    forward[:, 0, 0] = forward[:, 1, 1] = 1
    forward[:, 1, 0] = k  # x' = x + k * y
    return _affine(images, forward)


@corruption("scale")
def scale(images, rng):
    """A digit written small: shrunk to 45-60% of its size."""
    s = rng.uniform(0.45, 0.6, len(images))
    return _affine(images, s[:, None, None] * np.eye(2))


@corruption("rotate")
def rotate(images, rng):
    """A tilted page: rotated by 30 to 45 degrees, either way."""
    theta = np.radians(rng.uniform(30, 45, len(images))) * _signs(rng, len(images))
    c, s = np.cos(theta), np.sin(theta)
    return _affine(images, np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1))


@corruption("translate")
def translate(images, rng):
    """Off-centre: moved 4 to 6 pixels along each axis."""
    n = len(images)
    shift = rng.integers(4, 7, size=(n, 2)) * np.stack([_signs(rng, n), _signs(rng, n)], 1)
    inverse = np.zeros((n, 2, 3))
    inverse[:, 0, 0] = inverse[:, 1, 1] = 1
    inverse[:, :, 2] = -shift
    return _warp(images, inverse)


# --- stroke width and resolution -----------------------------------------------------------


_PLUS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))  # a pixel and its 4 neighbours


def _eroded(images: np.ndarray) -> np.ndarray:
    """Each pixel's least value over itself and its four neighbours (paper beyond the edge)."""
    return np.stack(
        [cv2.erode(i, _PLUS, borderType=cv2.BORDER_CONSTANT, borderValue=0) for i in images]
    )


def _dilated(images: np.ndarray) -> np.ndarray:
    """Each pixel's greatest value over itself and its four neighbours."""
    return np.stack([cv2.dilate(i, _PLUS, borderType=cv2.BORDER_CONSTANT) for i in images])


@corruption("thinner")
def thinner(images, rng):
    """A fine pen: strokes eroded, what is left brought back to full brightness."""
    eroded = (_eroded(images) + images) / 2
    peak = eroded.max(axis=(1, 2), keepdims=True)
    return eroded * 255 / np.maximum(peak, 1)


@corruption("thicker")
def thicker(images, rng):
    """A felt-tip pen: strokes dilated twice."""
    return _dilated(_dilated(images))


@corruption("low_resolution")
def low_resolution(images, rng):
    """A coarse scan: down to 12 x 12 pixels and back up."""
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images.astype(np.float32)):
        small = Image.fromarray(img, mode="F").resize((12, 12), Image.Resampling.BOX)
        out[i] = np.asarray(small.resize((28, 28), Image.Resampling.BILINEAR))
    return out


# --- light ---------------------------------------------------------------------------------


@corruption("brightness")
def brightness(images, rng):
    """Grey paper: the background lifted to a light grey."""
    return images + 120


@corruption("contrast")
def contrast(images, rng):
    """A washed-out photo: a quarter of the contrast, around mid-grey."""
    return 96 + images * 0.25


# --- occlusion -----------------------------------------------------------------------------


@corruption("stripe")
def stripe(images, rng):
    """A vertical band of 3 to 5 columns with its pixels inverted."""
    n = len(images)
    left = rng.integers(6, 19, size=n)[:, None]
    width = rng.integers(3, 6, size=n)[:, None]
    cols = np.arange(28)[None, :]
    band = ((cols >= left) & (cols < left + width))[:, None, :]
    return np.where(band, 255 - images, images)


@corruption("dotted_line")
def dotted_line(images, rng):
    """A dotted line drawn across the digit."""

    def shape(draw, rng):
        (x0, y0), (x1, y1) = rng.integers(0, 28, size=(2, 2))
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for t in range(0, steps + 1, 3):
            x, y = x0 + (x1 - x0) * t / steps, y0 + (y1 - y0) * t / steps
            draw.rectangle([x - 0.5, y - 0.5, x + 0.5, y + 0.5], fill=255)

    return _draw(images, rng, shape)


@corruption("zigzag")
def zigzag(images, rng):
    """A zigzag scribble across the digit."""

    def shape(draw, rng):
        x, y = rng.uniform(0, 8), rng.uniform(4, 24)
        points = [(x, y)]
        while x < 28:
            x += rng.uniform(3, 6)
            y = float(np.clip(y + rng.choice([-1, 1]) * rng.uniform(4, 10), 0, 27))
            points.append((x, y))
        draw.line(points, fill=255, width=int(rng.integers(1, 3)))

    return _draw(images, rng, shape)


@corruption("edges")
def edges(images, rng):
    """Outlines only: where the Sobel gradient is strong, as an edge detector would draw."""
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    gx, gy = _filter(images, sobel), _filter(images, sobel.T)
    return np.where(np.hypot(gx, gy) > 400, 255.0, 0.0)
