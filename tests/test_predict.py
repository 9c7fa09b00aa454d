"""`predict` on users' images: MNIST-style preprocessing, batching, the fast path, bad files."""

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageDraw, ImageFilter

from cnnmnist import checkpoint, preprocess, runners
from cnnmnist.cli import cli
from cnnmnist.preprocess import mnist as mnist_stage  # the `mnist` fixture has the name
from cnnmnist.preprocess import paper as paper_stage
from cnnmnist.preprocess import rules

N = 1000


def predict_json(args, **kwargs):
    result = CliRunner().invoke(cli, ["predict", "--json", *args], **kwargs)
    return result, json.loads(result.stdout) if result.stdout.strip() else None


def accuracy(rows, labels):
    return float(np.mean([r["digit"] == int(y) for r, y in zip(rows, labels, strict=True)]))


@pytest.fixture(scope="module")
def array_accuracy(trained, mnist):
    """The model's accuracy on the first N test digits fed as arrays (the SavedModel itself)."""
    saved_model = runners.load(checkpoint.read(trained.checkpoint), fast=False)
    probs = saved_model.probabilities(mnist.test_images[:N])
    return float((probs.argmax(axis=1) == mnist.test_labels[:N]).mean())


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, trained, mnist):
    folder = tmp_path_factory.mktemp("png")
    for i, image in enumerate(mnist.test_images[:N]):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    result, rows = predict_json([str(folder), "--model", str(trained.checkpoint)])
    assert result.exit_code == 0, result.output
    return accuracy(rows, mnist.test_labels[:N]), rows


def test_mnist_pngs_round_trip_within_half_a_point(round_trip, array_accuracy):
    png_accuracy, rows = round_trip
    assert len(rows) == N
    assert [r["file"][-8:] for r in rows[:3]] == ["0000.png", "0001.png", "0002.png"]  # sorted
    assert abs(png_accuracy - array_accuracy) <= 0.005, (png_accuracy, array_accuracy)


def photograph(digit: np.ndarray, rng) -> bytes:
    """What a person's photo of the digit looks like: dark ink on light paper, big, off-centre."""
    scale = int(rng.integers(4, 9))
    ink = Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.BILINEAR)
    paper = Image.new("L", (28 * scale + 200, 28 * scale + 120), color=int(rng.integers(215, 250)))
    paper.paste(
        ink,
        (int(rng.integers(0, 200)), int(rng.integers(0, 120))),
        mask=ink.point(lambda v: 255 - v),
    )
    noisy = np.asarray(paper, np.float64) + rng.normal(0, 4, (paper.height, paper.width))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert("RGB").save(
        buffer, "JPEG", quality=85
    )
    return buffer.getvalue()


def test_photographed_digits_within_two_points(tmp_path, trained, mnist, round_trip):
    rng = np.random.default_rng(0)
    for i, image in enumerate(mnist.test_images[:N]):
        (tmp_path / f"{i:04d}.jpg").write_bytes(photograph(image, rng))
    result, rows = predict_json([str(tmp_path), "--model", str(trained.checkpoint)])
    assert result.exit_code == 0, result.output
    photo_accuracy = accuracy(rows, mnist.test_labels[:N])
    assert abs(photo_accuracy - round_trip[0]) <= 0.02, (photo_accuracy, round_trip[0])


def test_preprocessing_is_nearly_the_identity_on_mnist(mnist):
    # Measured: about 0.15 grey levels per pixel on average (0.06 before the thinning of
    # strokes wider than MNIST's, which touches a few of its thickest digits).
    assert preprocess.mean_abs_change(mnist.test_images[:300]) < 0.5


def test_fast_path_matches_the_saved_model(trained, mnist):
    from cnnmnist import export

    meta = checkpoint.read(trained.checkpoint).metadata["fast_path"]
    assert meta["file"] == checkpoint.TFLITE
    assert meta["checked_on"] == export.TFLITE_CHECK_IMAGES
    model = runners.load(checkpoint.read(trained.checkpoint))
    assert model.name == "tflite"
    fast = model.probabilities(mnist.test_images[:2000])
    saved_model = runners.load(checkpoint.read(trained.checkpoint), fast=False)
    authority = saved_model.probabilities(mnist.test_images[:2000])
    assert np.array_equal(fast.argmax(axis=1), authority.argmax(axis=1))
    np.testing.assert_allclose(fast, authority, atol=export.TFLITE_TOLERANCE)


def test_without_the_fast_copy_the_saved_model_answers(tmp_path, trained, mnist):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.checkpoint, ckpt)
    (ckpt / checkpoint.TFLITE).unlink()
    Image.fromarray(mnist.test_images[0]).save(tmp_path / "a.png")
    result, rows = predict_json([str(tmp_path / "a.png"), "--model", str(ckpt)])
    assert result.exit_code == 0 and rows[0]["engine"] == "savedmodel"
    assert rows[0]["digit"] == int(mnist.test_labels[0])


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


def test_odd_formats_bad_files_and_exit_status(tmp_path, trained, mnist):
    seven = mnist.test_images[0]  # a 7
    assert int(mnist.test_labels[0]) == 7
    big = Image.fromarray(255 - seven).resize((140, 140), Image.BILINEAR)  # dark on white
    rgba = np.zeros((140, 140, 4), np.uint8)
    rgba[..., 3] = 255 - np.asarray(big)  # black strokes on a transparent background
    files = [
        save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"),
        save(Image.fromarray(np.asarray(big, np.uint16) * 257), tmp_path / "sixteen.png"),
        save(big.convert("P"), tmp_path / "palette.gif"),
        save(Image.new("RGB", (50, 50), "white"), tmp_path / "white.png"),
        save(Image.new("L", (1, 1), 0), tmp_path / "dot.bmp"),
        save(big.convert("CMYK"), tmp_path / "cmyk.jpg", format="JPEG"),
    ]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    truncated = io.BytesIO()
    big.save(truncated, "PNG")
    (tmp_path / "truncated.png").write_bytes(truncated.getvalue()[:200])
    jpeg = io.BytesIO()
    big.save(jpeg, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[:300])
    files += [
        str(tmp_path / n) for n in ("empty.png", "text.png", "truncated.png", "truncated.jpg")
    ]

    result, rows = predict_json([*files, "--model", str(trained.checkpoint)])
    assert result.exit_code == 1
    by_name = {r["file"].rsplit("/", 1)[-1]: r for r in rows}
    assert [r["file"] for r in rows] == files  # input order
    for name in ("rgba.png", "sixteen.png", "palette.gif", "cmyk.jpg"):
        assert by_name[name]["error"] is None and by_name[name]["digit"] == 7, by_name[name]
        assert len(by_name[name]["probabilities"]) == 10
    for name in ("white.png", "dot.bmp"):
        assert by_name[name]["error"] is None and by_name[name]["digit"] is None
        assert any("no ink" in w for w in by_name[name]["warnings"])
    assert "empty file" in by_name["empty.png"]["error"]
    assert "not an image" in by_name["text.png"]["error"]
    assert "cannot decode" in by_name["truncated.png"]["error"]
    assert "cannot decode" in by_name["truncated.jpg"]["error"]
    assert "4 of 10 inputs could not be predicted" in result.stderr


def test_stdin_table_and_show(tmp_path, trained, mnist):
    buffer = io.BytesIO()
    Image.fromarray(mnist.test_images[1]).save(buffer, "PNG")
    result = CliRunner().invoke(
        cli, ["predict", "-", "--show", "--model", str(trained.checkpoint)], input=buffer.getvalue()
    )
    assert result.exit_code == 0, result.output
    assert "<stdin>" in result.stdout and str(int(mnist.test_labels[1])) in result.stdout
    assert "the 28x28 input the model saw" in result.stdout
    assert "@@" in result.stdout  # the drawn strokes


def test_border_and_animation_warnings(tmp_path, trained):
    frames = [Image.new("L", (30, 30), 0) for _ in range(2)]
    frames[0].paste(255, (0, 5, 6, 25))  # a bar touching the left edge
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    result, rows = predict_json([str(tmp_path / "anim.gif"), "--model", str(trained.checkpoint)])
    assert result.exit_code == 0, result.output
    warnings = " ".join(rows[0]["warnings"])
    assert "first" in warnings and "touches the image border" in warnings


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    import struct
    import zlib

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )
    prepared = preprocess.prepare("bomb.png", png)
    assert prepared.pixels is None and "refusing to decode" in prepared.error


def test_a_float_image_with_infinite_pixels_is_an_error_naming_it():
    pixels = np.zeros((40, 40), np.float32)
    pixels[10:30, 18:22] = np.inf
    blob = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(blob, format="TIFF")
    prepared = preprocess.prepare("inf.tif", blob.getvalue())
    assert prepared.pixels is None and prepared.error.startswith("inf.tif: ")
    assert "not finite" in prepared.error


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.uint8, np.int16]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=40),
    )
)
def test_preprocessing_gives_28x28_uint8_or_our_error(array):
    try:
        pixels, _ = preprocess.to_mnist(
            preprocess.ink_map(array.astype(np.float64) / 255.0) if array.ndim == 2 else array
        )
    except preprocess.ImageError:
        return
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8


def test_a_directory_without_images_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no digits here")
    result = CliRunner().invoke(cli, ["predict", str(tmp_path), "--model", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no images found in" in result.output


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_a_photo_upright(orientation, mnist):
    """A phone stores a photo as its sensor saw it and the turn in EXIF tag 0x0112: each
    of the eight values must give the same 28x28 input as the upright image."""
    T = Image.Transpose
    # What exif_transpose applies for each value, and so its inverse: how the photo is stored.
    stored_as = {
        1: None,
        2: T.FLIP_LEFT_RIGHT,
        3: T.ROTATE_180,
        4: T.FLIP_TOP_BOTTOM,
        5: T.TRANSPOSE,
        6: T.ROTATE_90,  # shown after ROTATE_270
        7: T.TRANSVERSE,
        8: T.ROTATE_270,  # shown after ROTATE_90
    }[orientation]
    upright = Image.fromarray(255 - mnist.test_images[0]).resize((84, 112))  # a 7, not square
    stored = upright.transpose(stored_as) if stored_as is not None else upright.copy()
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = io.BytesIO()
    stored.save(blob, format="PNG", exif=exif.tobytes())
    plain = io.BytesIO()
    upright.save(plain, format="PNG")
    got = preprocess.prepare("photo.png", blob.getvalue())
    want = preprocess.prepare("upright.png", plain.getvalue())
    assert got.error is None and np.array_equal(got.pixels, want.pixels)
    if orientation in (5, 6, 7, 8):  # a quarter turn: ignoring the tag gives another input
        assert not np.array_equal(
            preprocess.prepare("raw.png", _without_exif(stored)).pixels, want.pixels
        )


def _without_exif(image) -> bytes:
    blob = io.BytesIO()
    image.save(blob, format="PNG")
    return blob.getvalue()


def _digit_ink(digit: np.ndarray, size: int, side: int) -> np.ndarray:
    """An MNIST digit enlarged to `side` px in the middle of a `size`-px square: ink in [0, 1]."""
    at = (size - side) // 2
    ink = np.zeros((size, size))
    ink[at : at + side, at : at + side] = (
        np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR)) / 255
    )
    return ink


def _on_paper(digit: np.ndarray, paper: np.ndarray, pen: float, side: int, noise: float = 0.0):
    """An MNIST digit enlarged to `side` px, in ink of grey level `pen`, in the middle of
    `paper` (grey levels), with sensor noise of `noise` grey levels: a PNG."""
    mask = _digit_ink(digit, paper.shape[0], side)
    photo = paper * (1 - mask) + pen * mask + np.random.default_rng(0).normal(0, noise, paper.shape)
    blob = io.BytesIO()
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(blob, format="PNG")
    return blob.getvalue()


def _as_photo(digit: np.ndarray, light: float, noise: float, size: int = 300):
    """An MNIST digit as a photo of dark ink on paper lit from one side: the paper's brightness
    falls by `light` across the picture, with sensor noise of `noise` grey levels."""
    paper = 235 - light * np.mgrid[:size, :size][1] / size
    return _on_paper(digit, paper, 40, size // 2, noise)


@pytest.mark.parametrize("light", [0, 60, 110])
def test_unevenly_lit_paper_keeps_the_strokes(mnist, light):
    digit = mnist.test_images[3]
    prepared = preprocess.prepare("photo.png", _as_photo(digit, light, noise=6))
    assert prepared.pixels.any(), "the strokes were taken for paper noise"
    clean = preprocess.to_mnist(preprocess.ink_map(digit / 255.0))[0].astype(float)
    got = prepared.pixels.astype(float)
    assert np.corrcoef(clean.ravel(), got.ravel())[0, 1] > 0.85


@pytest.mark.parametrize(("side", "floor"), [(10, 0.72), (12, 0.77)])
def test_a_digit_scanned_small_is_enlarged_back_to_itself(mnist, side, floor):
    """200 MNIST digits scanned `side` px square (area-averaged) and enlarged by `prepare`:
    the mean correlation with the digit prepared at full size. Bilinear enlarging, before
    Lanczos, gave 0.70 and 0.755."""
    same = []
    for digit in mnist.test_images[:200]:
        small = np.asarray(Image.fromarray(digit).resize((side, side), Image.BOX)) / 255
        got = preprocess.to_mnist(preprocess.ink_map(small))[0].astype(float).ravel()
        want = preprocess.to_mnist(preprocess.ink_map(digit / 255))[0].astype(float).ravel()
        same.append(np.corrcoef(got, want)[0, 1])
    assert np.mean(same) > floor


@pytest.mark.parametrize("tall", [8, 12, 16])
def test_a_low_resolution_digit_cropped_to_its_ink_is_still_read(tall):
    """A thick 0 cropped to its ink (its strokes are most of the border), scanned `tall`
    pixels high and enlarged: the border's median is no measure of the paper's noise."""
    ring = Image.new("L", (40, 60), 255)
    ImageDraw.Draw(ring).ellipse([0, 0, 39, 59], outline=0, width=8)
    small = ring.resize((round(40 * tall / 60), tall), Image.BOX)
    blob = io.BytesIO()
    small.resize((small.width * 4, small.height * 4), Image.BILINEAR).save(blob, format="PNG")
    prepared = preprocess.prepare("scan.png", blob.getvalue())
    assert (prepared.pixels > 128).sum() > 60  # the ring, not a blank image


def _vignetted(digit: np.ndarray, dark: float, size: int = 300) -> bytes:
    """An MNIST digit as a photo whose light falls off towards the corners, to `1 - dark` of
    the centre's there (a phone's lens, a lamp close by)."""
    ys, xs = (np.mgrid[:size, :size] - (size - 1) / 2) / ((size - 1) / 2)
    return _on_paper(digit, 230 * (1 - dark * (ys**2 + xs**2) / 2), 25, size // 2)


@pytest.mark.parametrize("dark", [0.3, 0.5, 0.6])
def test_a_photo_darker_in_the_corners_reads_like_the_clean_digit(mnist, dark):
    """Light falling off towards the corners is no plane, and with corners this dark the
    corners took the paper for ink (mean correlation 0.37 at 0.5 and 0.6)."""
    same = []
    for digit in mnist.test_images[:20]:
        clean = preprocess.to_mnist(preprocess.ink_map(digit / 255.0))[0].astype(float)
        got = preprocess.prepare("v.png", _vignetted(digit, dark)).pixels.astype(float)
        same.append(np.corrcoef(clean.ravel(), got.ravel())[0, 1] if got.any() else 0.0)
    assert np.mean(same) > 0.9


def _scan(digit: np.ndarray, tall: int, margin: int) -> bytes:
    """An MNIST digit as dark ink on white, cropped to its ink, scanned `tall` pixels high,
    enlarged 4x, with `margin` pixels of paper around it."""
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    crop = Image.fromarray(255 - digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    small = crop.resize((max(2, round(crop.width * tall / crop.height)), tall), Image.BOX)
    big = np.asarray(small.resize((small.width * 4, small.height * 4), Image.BILINEAR))
    blob = io.BytesIO()
    Image.fromarray(np.pad(big, margin, constant_values=255)).save(blob, format="PNG")
    return blob.getvalue()


@pytest.mark.parametrize("tall", [8, 12])
def test_a_blurred_scan_cropped_tight_reads_as_with_a_margin(mnist, tall):
    """Cropped to its ink, a blurred digit's border is mostly stroke: taking the border's
    middle for the paper thinned the strokes to broken lines (mean correlation 0.75)."""
    same = []
    for digit in mnist.test_images[:30]:
        tight = preprocess.prepare("tight.png", _scan(digit, tall, 0)).pixels.astype(float)
        margin = preprocess.prepare("margin.png", _scan(digit, tall, 12)).pixels.astype(float)
        same.append(np.corrcoef(tight.ravel(), margin.ravel())[0, 1] if tight.any() else 0.0)
    assert np.mean(same) > 0.88


def test_a_bold_scan_cropped_tight_keeps_its_polarity(mnist):
    """A bold digit scanned small and cropped to its ink has strokes along half its border,
    whose median then said nothing of which side is paper: 8 of these 60 digits were read
    with paper and ink swapped (mean correlation 0.82)."""
    same = []
    for digit in mnist.test_images[:60]:
        bold = np.asarray(Image.fromarray(digit).filter(ImageFilter.MaxFilter(3)))
        tight = preprocess.prepare("tight.png", _scan(bold, 8, 0)).pixels.astype(float)
        margin = preprocess.prepare("margin.png", _scan(bold, 8, 12)).pixels.astype(float)
        same.append(np.corrcoef(tight.ravel(), margin.ravel())[0, 1] if tight.any() else 0.0)
    assert sum(c < 0.5 for c in same) <= 2 and np.mean(same) > 0.88


def test_an_enlarged_small_digit_gets_steep_edges_like_mnist(mnist):
    """A digit of 8x8 pixels enlarged to 20 would be a blur of ramps; MNIST's are not."""

    def mid_grey_share(pixels):
        x = pixels / 255.0
        return ((x > 0.2) & (x < 0.8)).sum() / (x > 0.05).sum()

    steeper = []
    for digit in mnist.test_images[:20]:
        small = np.asarray(Image.fromarray(digit).resize((8, 8), Image.BOX))
        enlarged = preprocess.to_mnist(preprocess.ink_map(small / 255.0))[0]
        # The same few pixels merely interpolated up to the 20-pixel box:
        ink = preprocess.ink_map(small / 255.0)
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
        scale = mnist_stage.BOX / max(crop.shape)
        size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
        plain = np.asarray(Image.fromarray(crop, mode="F").resize(size, Image.BILINEAR)) * 255
        steeper.append(mid_grey_share(plain) - mid_grey_share(enlarged))
    assert min(steeper) > 0 and np.mean(steeper) > 0.1


@pytest.mark.parametrize("width", [2, 3, 5, 7])
def test_stroke_width_measures_a_ring(width):
    ring = Image.new("L", (200, 200), 0)
    ImageDraw.Draw(ring).ellipse([20, 20, 180, 180], outline=255, width=width * 8)
    ink = np.asarray(ring.resize((25, 25), Image.BOX)) / 255.0
    assert mnist_stage.stroke_width(ink) == pytest.approx(width, abs=0.2)


def _marker(digit: np.ndarray, pen: int) -> bytes:
    """An MNIST digit drawn 4x larger, its strokes widened by a `pen`-pixel maximum filter
    (pen - 1 pixels wider), dark on white paper."""
    big = Image.fromarray(digit).resize((112, 112), Image.BILINEAR)
    blob = io.BytesIO()
    Image.fromarray(255 - np.pad(np.asarray(big.filter(ImageFilter.MaxFilter(pen))), 24)).save(
        blob, format="PNG"
    )
    return blob.getvalue()


def test_a_digit_drawn_with_a_marker_gets_strokes_as_wide_as_mnists(mnist, monkeypatch):
    """Strokes wider than MNIST's (a marker, a coarse scan enlarged) are thinned; MNIST's own
    digits are left as they are."""
    digits = mnist.test_images[:30]

    def widths():
        return [
            mnist_stage.stroke_width(preprocess.prepare("m.png", _marker(d, 13)).pixels / 255)
            for d in digits
        ]

    limit, thinned, own = mnist_stage.MAX_STROKE, widths(), preprocess.prepare_pixels(digits)
    assert np.median(thinned) < limit and max(thinned) < limit + 0.25
    monkeypatch.setattr(mnist_stage, "MAX_STROKE", np.inf)  # the same, not thinned
    assert np.median(widths()) > limit + 0.5
    assert (preprocess.prepare_pixels(digits) == own).all(axis=(1, 2)).mean() > 0.9


def test_salt_and_pepper_on_clean_paper_is_removed_before_cropping(mnist):
    """Sparse white specks on black paper leave the border's median at the paper and its
    spread at 0, so the image looked clean; the specks then stretched the digit's box to
    the whole image (mean correlation 0.39)."""
    from cnnmnist import corruptions

    clean = preprocess.prepare_pixels(mnist.test_images[:50]).astype(float)
    salted = preprocess.prepare_pixels(corruptions.apply("impulse_noise", mnist.test_images[:50]))
    same = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(clean, salted, strict=True)]
    assert np.mean(same) > 0.7  # a few clusters of salt outlast the median
    # A clean digit, with its own stray pixel or two, is left as it is.
    digit = mnist.test_images[0].copy()
    digit[1, 1] = digit[26, 3] = 200
    assert paper_stage._specks(digit > 5) == 2
    assert np.array_equal(preprocess.ink_map(digit / 255.0), digit / 255.0)


def _notebook(digit: np.ndarray, lines: str, tilt: float, grey: int, size: int = 300) -> bytes:
    """An MNIST digit in dark ink on a notebook's page: `lines` "ruled", "squared" or "" (plain
    paper), 2 px wide in `grey`, 40 px apart, the page turned by `tilt` degrees."""
    page = Image.new("L", (size, size), 235)
    draw, rise = ImageDraw.Draw(page), np.tan(np.radians(tilt)) * size
    for at in range(13, size, 40) if lines else []:
        draw.line([(0, at), (size, at + rise)], fill=grey, width=2)
        if lines == "squared":
            draw.line([(at, 0), (at - rise, size)], fill=grey, width=2)
    return _on_paper(digit, np.asarray(page, dtype=np.float64), 30, 168)


@pytest.mark.parametrize("lines", ["ruled", "squared"])
@pytest.mark.parametrize("tilt", [0, 2])
@pytest.mark.parametrize("grey", [170, 110])
def test_a_notebooks_lines_are_not_taken_for_the_digit(mnist, monkeypatch, lines, tilt, grey):
    """Ruled or squared paper: lines across the page stretched the digit's box to all of it."""
    digits = mnist.test_images[:12]
    plain = [
        preprocess.prepare("p.png", _notebook(d, "", 0, grey)).pixels.astype(float) for d in digits
    ]

    def agreement():
        got = [preprocess.prepare("n.png", _notebook(d, lines, tilt, grey)).pixels for d in digits]
        same = zip(plain, got, strict=True)
        return np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in same])

    assert agreement() > 0.9
    monkeypatch.setattr(rules, "without_rules", lambda ink, level: ink)
    monkeypatch.setattr(rules, "without_slivers", lambda ink, level: ink)  # the lines' ends
    assert agreement() < 0.6


@pytest.mark.parametrize(
    "sliver",
    [
        [(0, 5), (300, -6)],  # a ruled line turned off the top edge, inside for under half
        [(300, 292), (150, 301)],  # one leaving at the bottom right corner
        [(1, 0), (1, 300)],  # the page's edge along the left side
    ],
)
def test_a_lines_end_along_the_edge_is_not_taken_for_the_digit(mnist, monkeypatch, sliver):
    """What is left of a line at the image's edge, too short to be traced as one, stretched
    the digit's box to the edge and shrank the digit."""
    digits = mnist.test_images[:12]
    page = Image.new("L", (300, 300), 235)
    ImageDraw.Draw(page).line(sliver, fill=150, width=3)
    with_sliver = np.asarray(page, dtype=np.float64)
    plain = [
        preprocess.prepare("p.png", _on_paper(d, np.full((300, 300), 235.0), 30, 168))
        for d in digits
    ]

    def agreement():
        got = [
            preprocess.prepare("s.png", _on_paper(d, with_sliver, 30, 168)).pixels for d in digits
        ]
        same = zip(plain, got, strict=True)
        return np.mean([np.corrcoef(a.pixels.ravel(), b.ravel())[0, 1] for a, b in same])

    assert agreement() > 0.9
    monkeypatch.setattr(rules, "without_slivers", lambda ink, level: ink)
    assert agreement() < 0.6


@pytest.mark.parametrize("gap", [6, 10])
def test_a_line_near_the_edge_under_the_digit_is_removed(mnist, gap):
    """A digit written `gap` px above a ruled line that lies near the image's bottom edge:
    closer than the margin a digit keeps from such a line, but not touching it."""
    for digit in mnist.test_images[:12]:
        ink = _digit_ink(digit, 300, 168)
        below = np.flatnonzero((ink > 0.5).any(axis=1))[-1] + gap
        ink = ink[: below + 10]
        lined = ink.copy()
        lined[below : below + 2] = 0.6
        out, strokes = rules.without_rules(lined, paper_stage.INK_FLOOR), ink > 0.5
        assert not out[below:].any()
        assert np.array_equal(out[strokes], ink[strokes])  # a blurred edge may lose a row


def _dim_squared_page(edges: list[str], towards: bool, size: int = 400) -> np.ndarray:
    """Squared paper (grey levels) in dim light, cropped along its lines at `edges`; the light
    falls off towards the corner where they meet, or away from it."""
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    rows = [1] * ("top" in edges) + list(range(40, size, 40)) + [size - 2] * ("bottom" in edges)
    cols = [1] * ("left" in edges) + list(range(40, size, 40)) + [size - 2] * ("right" in edges)
    for at in rows:
        draw.line([(0, at), (size, at)], fill=150, width=2)
    for at in cols:
        draw.line([(at, 0), (at, size)], fill=150, width=2)
    ys, xs = np.mgrid[:size, :size] / size
    away = ys + xs if "top" in edges else 2 - ys - xs  # from the lines' corner
    return np.asarray(page, dtype=np.float64) * 0.78 * (1 - (2 - away if towards else away) / 8)


@pytest.mark.parametrize("towards", [False, True])
@pytest.mark.parametrize("edges", [["top", "left"], ["bottom", "right"]])
def test_a_dim_page_cropped_along_its_lines_is_read_as_paper(mnist, edges, towards):
    """The border's median lies near the middle of the image's range, and two or three of the
    four corners are on a line: the corners' rule read the paper as ink (along the bottom and
    right). And the lines along two sides tilted the light fitted to the border towards
    them, so that lines on the far side stayed."""
    page, plain, same = _dim_squared_page(edges, towards), np.full((400, 400), 235.0), []
    for digit in mnist.test_images[:12]:
        blob = _on_paper(digit, page, 50, 224, noise=6)
        assert paper_stage._light_paper(preprocess.decode(blob, "d.png")[0])
        got = preprocess.prepare("d.png", blob).pixels.ravel()
        want = preprocess.prepare("p.png", _on_paper(digit, plain, 30, 224)).pixels.ravel()
        same.append(np.corrcoef(want, got)[0, 1])
    assert np.mean(same) > 0.9


def test_a_lines_end_along_the_edge_does_not_keep_the_page_lined(mnist):
    """What is left of a line along the edge is not traced as a line, and stretched the
    digit's extent to the edge, so that no line seemed to pass the digit: all stayed."""
    ink = _digit_ink(mnist.test_images[0], 400, 200)
    digit = ink.copy()
    for at in range(20, 400, 40):
        ink[at : at + 2] = np.maximum(ink[at : at + 2], 0.6)
        ink[:, at : at + 2] = np.maximum(ink[:, at : at + 2], 0.6)
    ink[398:, :150] = 0.6  # a line leaving the image at its bottom edge
    out = rules.without_rules(ink, paper_stage.INK_FLOOR)
    assert not out[:398][digit[:398] == 0].any()
    assert (out[digit > 0.5] > 0).mean() > 0.95  # where a line crosses a stroke's end, it goes


def _thin_digit(strokes, margin: float, pen: int = 3, turn: float = 0, size: int = 400):
    """Strokes ((x, y) points in a unit square) drawn `pen` px wide on a `size`-px canvas,
    turned by `turn` degrees, cropped to the ink plus `margin` of the canvas's side: grey,
    dark on white."""
    image = Image.new("L", (size, size), 255)
    for stroke in strokes:
        ImageDraw.Draw(image).line([(x * size, y * size) for x, y in stroke], fill=0, width=pen)
    image = image.rotate(turn, resample=Image.BILINEAR, fillcolor=255)
    box = Image.eval(image, lambda v: 255 - v).getbbox()
    pad = round(margin * size)
    crop = np.asarray(image.crop(box))
    return np.pad(crop, pad, constant_values=255) / 255.0


@pytest.mark.parametrize("turn", [-3, 0, 3])
@pytest.mark.parametrize("margin", [0, 0.01, 0.03])
@pytest.mark.parametrize(
    "strokes",
    [
        [[(0.1, 0.1), (0.9, 0.1), (0.4, 0.95)]],  # 7: its bar
        [[(0.6, 0.05), (0.1, 0.65), (0.95, 0.65)], [(0.75, 0.3), (0.75, 0.98)]],  # 4: its bar
        [[(0.3, 0.2), (0.5, 0.02), (0.5, 0.98)]],  # 1: its stem
        [[(0.42, 0.12), (0.5, 0.02), (0.5, 0.95)], [(0.15, 0.95), (0.85, 0.95)]],  # 1: its foot
        [[(0.2, 0.2), (0.8, 0.2), (0.8, 0.5), (0.1, 0.95), (0.9, 0.95)]],  # 2: its base
    ],
)
def test_a_thin_digits_own_bars_are_not_ruled_lines(strokes, margin, turn):
    """Cropped close, a thin pen's bar, stem or foot crosses most of the image, as a ruled
    line does, and may lie along its edge; it must stay."""
    ink = 1 - _thin_digit(strokes, margin, turn=turn)
    assert np.array_equal(rules.without_rules(ink, paper_stage.INK_FLOOR), ink)
    assert np.array_equal(rules.without_slivers(ink, paper_stage.INK_FLOOR), ink)


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("level", [1, 128, 254])
def test_a_uniform_grey_image_is_blank_not_a_crash(side, level):
    """One grey level all over (found by Hypothesis): the light fitted to the border of a
    digit cropped tight kept only pixels under it, and rounding left none."""
    blob = io.BytesIO()
    Image.fromarray(np.full((side, side), level, np.uint8)).save(blob, format="PNG")
    prepared = preprocess.prepare("grey.png", blob.getvalue())
    assert prepared.error is None and not prepared.pixels.any()
    assert prepared.warnings == ["no ink found: the image looks blank"]


def test_a_faint_image_the_contrast_curve_empties_is_blank():
    """A small faint image whose enlarged ink the contrast curve takes entirely for blur
    (found by Hypothesis): it divided by the digit's zero mass."""
    image = np.full((6, 25), 128, np.uint8)
    image[0, 0] = image[0, 2] = image[4, 5] = image[5, 7] = 0
    image[5, 5] = 90
    pixels, warnings = preprocess.to_mnist(preprocess.ink_map(image / 255.0))
    assert not pixels.any() and warnings[-1] == "no ink found: the image looks blank"
