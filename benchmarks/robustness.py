"""How well checkpoints read digits that are not MNIST's: a development set of user-like digits,
rendered here from offline sources, and the corruption suite on the MNIST test set.

    python benchmarks/robustness.py CKPT [CKPT ...] [--devset DIR] [--out FILE] [--parts P,...]

Parts of the development set (each a folder laid out for `cnnmnist evaluate --images`):
  printed        digits 0-9 in every TrueType font the machine has, three sizes, slightly turned
  canvas         digits drawn as a web canvas holds them: stroke templates, jittered by hand-like
                 slant, turn and proportion, in binary strokes of four pen widths, black on white
  low_resolution printed and canvas digits rendered 8 to 12 pixels tall, scaled back up
  photos         canvas and printed digits on coloured, unevenly lit, noisy paper in dark ink,
                 saved as JPEG, stored sideways with an EXIF Orientation tag as phones do
  notebook       canvas and printed digits photographed on ruled or squared notebook paper:
                 light or dark lines, the page turned up to 2 degrees, saved as JPEG
  other_writers  scikit-learn's handwritten digits (UCI optdigits: 1,797 8x8 scans of 43
                 writers other than MNIST's), installed offline with the package
  box_scans      handwritten digits as box-normalised scan collections store them: canvas
                 and other writers' digits cropped to the ink, half of them cut where they
                 left the scanner's box, stretched on both axes to fill a square of 16 or 12
                 pixels, and binarised at one of three thresholds

Nothing comes from the MNIST test images. The set is seeded: every run renders the same images.
For each checkpoint the script runs `cnnmnist evaluate CKPT --images PART --json` per part and
`cnnmnist evaluate CKPT --corruptions --json`, then writes the checkpoints' rows into
benchmarks/results/robustness.json (other checkpoints' rows stay, and the command is added to
those recorded) and prints a Markdown table (kept in docs/robustness.md) whose accuracy counts
an image read as no digit at all (blank after preprocessing) as a mistake.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
SEED = 16
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "/Library/Fonts")
PARTS = (
    "printed",
    "canvas",
    "low_resolution",
    "photos",
    "notebook",
    "other_writers",
    "box_scans",
)

# Digits as a hand draws them on a canvas: strokes of (x, y) points in a unit square, y down.
# Two forms for the digits people write two ways.


def _ellipse(cx, cy, rx, ry, start=0.0, end=2 * np.pi, n=24):
    t = np.linspace(start, end, n)
    return [(cx + rx * np.sin(a), cy - ry * np.cos(a)) for a in t]


TEMPLATES: dict[int, list[list[list[tuple[float, float]]]]] = {
    0: [[_ellipse(0.5, 0.5, 0.28, 0.42)], [_ellipse(0.5, 0.5, 0.2, 0.42)]],
    1: [[[(0.5, 0.08), (0.5, 0.92)]], [[(0.32, 0.25), (0.55, 0.08), (0.55, 0.92)]]],
    2: [
        [
            [
                (0.22, 0.3),
                (0.32, 0.13),
                (0.52, 0.08),
                (0.72, 0.16),
                (0.75, 0.34),
                (0.6, 0.52),
                (0.2, 0.9),
                (0.82, 0.9),
            ]
        ],
        [
            [
                (0.25, 0.25),
                (0.5, 0.08),
                (0.75, 0.25),
                (0.7, 0.45),
                (0.25, 0.88),
                (0.4, 0.82),
                (0.6, 0.86),
                (0.8, 0.9),
            ]
        ],
    ],
    3: [
        [
            [
                (0.22, 0.15),
                (0.5, 0.07),
                (0.75, 0.2),
                (0.7, 0.38),
                (0.45, 0.48),
                (0.72, 0.58),
                (0.78, 0.76),
                (0.55, 0.92),
                (0.22, 0.85),
            ]
        ],
        [
            [
                (0.25, 0.1),
                (0.75, 0.1),
                (0.45, 0.42),
                (0.72, 0.55),
                (0.76, 0.76),
                (0.52, 0.92),
                (0.25, 0.84),
            ]
        ],
    ],
    4: [
        [[(0.62, 0.92), (0.62, 0.08), (0.15, 0.66), (0.85, 0.66)]],
        [[(0.25, 0.08), (0.2, 0.55), (0.82, 0.55)], [(0.66, 0.2), (0.66, 0.92)]],
    ],
    5: [
        [
            [
                (0.75, 0.1),
                (0.3, 0.1),
                (0.26, 0.45),
                (0.55, 0.4),
                (0.75, 0.55),
                (0.75, 0.76),
                (0.55, 0.92),
                (0.22, 0.85),
            ]
        ],
        [
            [
                (0.3, 0.1),
                (0.26, 0.45),
                (0.55, 0.4),
                (0.75, 0.55),
                (0.75, 0.76),
                (0.55, 0.92),
                (0.22, 0.85),
            ],
            [(0.3, 0.1), (0.78, 0.1)],
        ],
    ],
    6: [
        [
            [
                (0.7, 0.08),
                (0.42, 0.3),
                (0.26, 0.6),
                (0.3, 0.85),
                (0.55, 0.93),
                (0.75, 0.76),
                (0.7, 0.56),
                (0.45, 0.5),
                (0.27, 0.62),
            ]
        ],
        [
            [
                (0.62, 0.08),
                (0.3, 0.45),
                (0.3, 0.82),
                (0.5, 0.93),
                (0.7, 0.8),
                (0.68, 0.6),
                (0.5, 0.52),
                (0.3, 0.65),
            ]
        ],
    ],
    7: [
        [[(0.2, 0.12), (0.8, 0.12), (0.45, 0.92)]],
        [[(0.2, 0.12), (0.8, 0.12), (0.5, 0.92)], [(0.38, 0.5), (0.72, 0.5)]],
    ],
    8: [
        [_ellipse(0.5, 0.29, 0.19, 0.21), _ellipse(0.5, 0.71, 0.24, 0.21)],
        [_ellipse(0.5, 0.3, 0.17, 0.22, np.pi, 3 * np.pi), _ellipse(0.5, 0.72, 0.22, 0.2)],
    ],
    9: [
        [_ellipse(0.48, 0.3, 0.22, 0.21), [(0.7, 0.28), (0.68, 0.92)]],
        [_ellipse(0.5, 0.28, 0.2, 0.2), [(0.7, 0.3), (0.55, 0.92)]],
    ],
}


def fonts() -> list[Path]:
    found = set()
    for d in FONT_DIRS:
        root = Path(d).expanduser()
        if root.is_dir():
            found |= {p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf")}
    return sorted(found)


def _printed(font: Path, digit: int, height: int, angle: float, size: int = 96) -> Image.Image:
    face = ImageFont.truetype(str(font), height)
    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).text((size / 2, size / 2), str(digit), font=face, fill=0, anchor="mm")
    return image.rotate(angle, resample=Image.BILINEAR, fillcolor=255)


def _canvas(digit: int, form: int, pen: int, rng, size: int = 280) -> Image.Image:
    """A digit drawn on a white canvas in black, as a browser's canvas holds it."""
    slant = rng.uniform(-0.3, 0.3)
    turn = np.radians(rng.uniform(-10, 10))
    sx, sy = rng.uniform(0.75, 1.1), rng.uniform(0.85, 1.05)
    c, s = np.cos(turn), np.sin(turn)
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    for stroke in TEMPLATES[digit][form]:
        points = np.array(stroke) - 0.5
        points += rng.normal(0, 0.012, points.shape)  # a hand is not a ruler
        points[:, 0] = points[:, 0] * sx - slant * points[:, 1]
        points[:, 1] *= sy
        points = points @ np.array([[c, -s], [s, c]]).T
        xy = [(float(x), float(y)) for x, y in (points * 0.7 + 0.5) * size]
        draw.line(xy, fill=0, width=pen, joint="curve")
        for x, y in (xy[0], xy[-1]):  # round caps, as a canvas with lineCap "round"
            draw.ellipse([x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2], fill=0)
    return image


def _paper(ink: Image.Image, rng, size: int = 400, ruled: bool = False) -> Image.Image:
    """The digit (dark on white) as a phone photo of it on coloured, unevenly lit paper; ruled:
    on a notebook's page."""
    paper = np.array(rng.uniform(175, 245, 3))
    ys, xs = np.mgrid[:size, :size] / size
    light = 0.75 + 0.25 * (rng.uniform(0, 1) * xs + rng.uniform(0, 1) * ys) / 2 * 2
    if ruled:
        paper = _ruled(paper, rng, size)
    colour = paper * np.clip(light, 0, 1)[..., None]
    digit = ink.resize((int(size * rng.uniform(0.45, 0.8)),) * 2, Image.BILINEAR)
    mask = np.zeros((size, size))
    ox, oy = rng.integers(0, size - digit.width, size=2)
    mask[oy : oy + digit.height, ox : ox + digit.width] = 1 - np.asarray(digit) / 255
    pen = np.array(rng.choice([[20, 25, 90], [25, 25, 30], [80, 80, 85]]))
    rgb = colour * (1 - mask[..., None]) + pen[None, None, :] * mask[..., None]
    rgb += rng.normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _ruled(paper: np.ndarray, rng, size: int) -> np.ndarray:
    """A notebook page of the paper's colour: ruled lines, or squares, light blue or grey (one
    page in four: darker), 1 to 3 pixels wide, 9 to 15% of the page apart, turned by up to 2
    degrees as a photo of it is."""
    page = Image.new("RGB", (size, size), tuple(int(v) for v in paper))
    draw = ImageDraw.Draw(page)
    if rng.uniform() < 0.25:
        colour = (int(rng.integers(90, 140)),) * 3
    else:
        colour = tuple(int(v) for v in rng.uniform([130, 160, 200], [190, 210, 250]))
    width, gap = int(rng.integers(1, 4)), size * rng.uniform(0.09, 0.15)
    tilt = np.tan(np.radians(rng.uniform(-2, 2))) * size
    squared = rng.uniform() < 0.5
    for at in np.arange(rng.uniform(0, gap), size, gap):
        draw.line([(0, at), (size, at + tilt)], fill=colour, width=width)
        if squared:
            draw.line([(at, 0), (at - tilt, size)], fill=colour, width=width)
    return np.asarray(page, dtype=np.float64)


# exif_transpose applies these to view an image stored with each Orientation value; a phone
# stores the inverse.
_STORE = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


def _boxed(ink: Image.Image, rng) -> Image.Image:
    """A digit (dark on white) as a box-normalised scan collection stores it: cropped to its
    ink; in half of them cut at one or two sides, by 8-20% of its extent, where it left the
    scanner's box; stretched on both axes to fill a square of 16 or 12 pixels; binarised at
    a threshold of 35, 50 or 65% ink; black on white, at that size."""
    ink_map = 1 - np.asarray(ink.convert("L"), dtype=np.float64) / 255
    rows, cols = (
        np.flatnonzero(ink_map.max(axis=1) > 0.2),
        np.flatnonzero(ink_map.max(axis=0) > 0.2),
    )
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if rng.random() < 0.5:
        for side in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
            height, width = bottom - top, right - left
            cut = rng.uniform(0.08, 0.2)
            if side == 0:
                top += int(cut * height)
            elif side == 1:
                bottom -= int(cut * height)
            elif side == 2:
                left += int(cut * width)
            else:
                right -= int(cut * width)
    crop = Image.fromarray(np.round(ink_map[top:bottom, left:right] * 255).astype(np.uint8))
    box = int(rng.choice([16, 16, 12]))
    stretched = np.asarray(crop.resize((box, box), Image.Resampling.BOX), dtype=np.float64)
    threshold = 255 * float(rng.choice([0.35, 0.5, 0.65]))
    return Image.fromarray(np.where(stretched > threshold, 0, 255).astype(np.uint8))


def _jpeg_with_orientation(image: Image.Image, orientation: int, quality: int) -> bytes:
    for step in _STORE[orientation]:
        image = image.transpose(step)
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = io.BytesIO()
    image.save(blob, format="JPEG", quality=quality, exif=exif.tobytes())
    return blob.getvalue()


def render(root: Path) -> dict[str, int]:
    """Render every part under root/PART/DIGIT/; return the number of images per part."""
    rng = np.random.default_rng(SEED)
    counts = dict.fromkeys(PARTS, 0)

    def save(part: str, digit: int, image: Image.Image | bytes, suffix: str = "png") -> None:
        folder = root / part / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{counts[part]:05d}.{suffix}"
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path)
        counts[part] += 1

    faces = fonts()
    for font in faces:
        for digit in range(10):
            for height in (28, 48, 72):
                save("printed", digit, _printed(font, digit, height, rng.uniform(-6, 6)))
    for digit in range(10):
        for form in range(2):
            for pen in (6, 12, 20, 28):  # thin to thick, on a 280-pixel canvas
                for _ in range(5):
                    save("canvas", digit, _canvas(digit, form, pen, rng))
    for digit in range(10):
        for k in range(40):  # half printed, half drawn, 8 to 12 pixels tall
            if k % 2:
                big = _printed(faces[k % len(faces)], digit, 72, rng.uniform(-5, 5))
            else:
                big = _canvas(digit, k % 4 // 2, int(rng.choice([12, 20, 28])), rng)
            box = Image.eval(big, lambda v: 255 - v).getbbox() or (0, 0, big.width, big.height)
            crop = big.crop(box)
            tall = int(rng.integers(8, 13))
            small = crop.resize((max(1, round(crop.width * tall / crop.height)), tall), Image.BOX)
            save(
                "low_resolution",
                digit,
                small.resize((small.width * 4, small.height * 4), Image.BILINEAR),
            )
    for digit in range(10):
        for k in range(40):
            if k % 2:
                ink = _printed(faces[(7 * k) % len(faces)], digit, 60, rng.uniform(-8, 8))
            else:
                ink = _canvas(digit, k % 4 // 2, int(rng.choice([12, 20])), rng)
            photo = _paper(ink, rng)
            orientation = int(rng.integers(1, 9))
            save(
                "photos",
                digit,
                _jpeg_with_orientation(photo, orientation, int(rng.integers(60, 92))),
                "jpg",
            )
    from sklearn.datasets import load_digits

    writers = load_digits()
    for image, label in zip(writers.images, writers.target, strict=True):
        pixels = np.round(image / 16 * 255).astype(np.uint8)  # white ink on black, 8x8
        save("other_writers", int(label), Image.fromarray(pixels))
    # Last, so that the parts above are drawn from the same random numbers as before it.
    for digit in range(10):
        for k in range(40):
            if k % 2:
                ink = _printed(faces[(3 * k) % len(faces)], digit, 60, rng.uniform(-8, 8))
            else:
                ink = _canvas(digit, k % 4 // 2, int(rng.choice([6, 12, 20])), rng)
            page = _paper(ink, rng, ruled=True)
            blob = io.BytesIO()
            page.save(blob, format="JPEG", quality=int(rng.integers(70, 93)))
            save("notebook", digit, blob.getvalue(), "jpg")
    # Last again, for the same reason.
    by_digit = {d: np.flatnonzero(writers.target == d) for d in range(10)}
    for digit in range(10):
        for k in range(60):  # handwriting: drawn on a canvas, and other writers' scans
            if k % 2 == 0:
                ink = _canvas(digit, k // 2 % 2, int(rng.choice([12, 20, 28])), rng)
            else:
                scan = writers.images[int(rng.choice(by_digit[digit]))] / 16
                ink = Image.fromarray(np.round(255 - scan * 255).astype(np.uint8))
                ink = ink.resize((64, 64), Image.Resampling.BILINEAR)
            save("box_scans", digit, _boxed(ink, rng))
    return counts


def _cnnmnist(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "cnnmnist", *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"cnnmnist {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def measure(ckpt: Path, devset: Path, parts=PARTS, corruptions: bool = True) -> dict:
    meta = json.loads((ckpt / "cnnmnist.json").read_text())
    row = {
        "checkpoint": str(ckpt),
        "preset": meta.get("preset"),
        "seed": meta.get("seed"),
        "mnist_test_accuracy": (meta.get("test") or {}).get("accuracy"),
        "parts": {},
    }
    for part in parts:
        report = _cnnmnist("evaluate", str(ckpt), "--images", str(devset / part))
        worst = min(report["per_class"], key=lambda c: c["recall"])
        row["parts"][part] = {
            "n": report["n"],
            "accuracy": report["accuracy"],
            "accuracy_ci95": report["accuracy_ci95"],
            "worst_class": {"label": worst["label"], "recall": worst["recall"]},
            "unreadable": len(report["unreadable"]),
            # What a user gets: an image read as no digit at all counts as a mistake.
            "accuracy_of_all": report["correct"] / (report["n"] + len(report["unreadable"])),
        }
    if not corruptions:
        return row
    suite = _cnnmnist("evaluate", str(ckpt), "--corruptions")
    row["corruptions"] = {
        "clean_accuracy": suite["clean_accuracy"],
        "mean_accuracy": suite["mean_accuracy"],
        "by_name": {c["name"]: c["accuracy"] for c in suite["corruptions"]},
        "mean_accuracy_prepared": suite["mean_accuracy_prepared"],
        "by_name_prepared": {c["name"]: c["accuracy_prepared"] for c in suite["corruptions"]},
    }
    return row


def table(rows: list[dict]) -> str:
    head = ["checkpoint", "MNIST test", *PARTS, "corruption mean (raw / prepared)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"`{r['preset']}` seed {r['seed']}", f"{r['mnist_test_accuracy']:.2%}"]
        for part in PARTS:
            if part not in r["parts"]:  # a row measured before the part existed
                cells.append("-")
                continue
            p = r["parts"][part]
            w = p["worst_class"]
            cells.append(f"{p['accuracy_of_all']:.1%} (worst {w['label']}: {w['recall']:.0%})")
        suite = r["corruptions"]
        cells.append(f"{suite['mean_accuracy']:.1%} / {suite['mean_accuracy_prepared']:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--devset", type=Path, default=Path("devset"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "robustness.json")
    parser.add_argument(
        "--parts",
        type=lambda text: tuple(text.split(",")),
        default=PARTS,
        help="measure only these parts (comma-separated) and update the checkpoints' rows "
        "already in --out; the corruption suite is not re-run",
    )
    args = parser.parse_args()
    if unknown := set(args.parts) - set(PARTS):
        parser.error(f"no part {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    every = set(args.parts) == set(PARTS)
    record = json.loads(args.out.read_text()) if args.out.exists() else {"command": []}
    earlier = {row["checkpoint"]: row for row in record.get("checkpoints", [])}
    if not every and (missing := [str(c) for c in args.checkpoints if str(c) not in earlier]):
        parser.error(f"{args.out} has no row for {', '.join(missing)}: measure every part")
    started = time.perf_counter()
    counts = render(args.devset)
    print(
        f"rendered {counts} into {args.devset} in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    rows = []
    for ckpt in args.checkpoints:
        rows.append(measure(ckpt, args.devset, args.parts, corruptions=every))
        print(f"measured {ckpt}", file=sys.stderr)
    command = " ".join(["python benchmarks/robustness.py", *sys.argv[1:]])
    devset = {"seed": SEED, "images": counts, "fonts": len(fonts())}
    for row in rows:  # other checkpoints' rows stay; these checkpoints' are replaced or updated
        if every:
            earlier[row["checkpoint"]] = row
        else:
            earlier[row["checkpoint"]]["parts"].update(row["parts"])
    commands = record["command"]
    commands = commands if isinstance(commands, list) else [commands]
    if every and set(earlier) == {row["checkpoint"] for row in rows}:
        commands = []  # every row is this run's
    record["command"] = commands if command in commands else [*commands, command]
    record["devset"] = devset
    record["checkpoints"] = rows = list(earlier.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
