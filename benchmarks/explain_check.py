"""`explain` measured: whether its evidence maps point at what the answer rests on, and how
long it takes, whole process and on the page.

    python benchmarks/explain_check.py CKPT [CKPT ...] [--digits 1000] [--out FILE]

For each checkpoint, on the first DIGITS MNIST test digits: the 20 ink pixels the evidence
map ranks highest are painted over, and so are 20 ink pixels drawn at random; how much each
lowers the answer's probability (the mean drop, and how often the top-ranked pixels cost
more). Then, on a 280x280 canvas drawing of a 7: `cnnmnist explain` as a whole process (with
and without --plot, median of 5), and `serve`'s POST /predict against POST /explain (median
and p90 of 50 requests on loopback, the page's two requests per stroke). Writes
benchmarks/results/explain.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
TOP = 20


def evidence_check(ckpt: Path, images: np.ndarray) -> dict:
    from cnnmnist import checkpoint, explain, runners

    model = runners.load(checkpoint.read(ckpt))
    rng = np.random.default_rng(0)
    top, random, wins = [], [], 0
    for image in images:
        row = model.probabilities(image.reshape(1, 28, 28, 1))[0]
        digit = int(row.argmax())
        evidence = explain.occlusion(model.probabilities, image, (digit,))[0]
        ink = np.flatnonzero(image.ravel() > 64)
        chosen = {
            "top": ink[np.argsort(-evidence.ravel()[ink])][:TOP],
            "random": rng.choice(ink, size=min(TOP, len(ink)), replace=False),
        }
        drops = {}
        for name, hidden in chosen.items():
            copy = image.astype(np.float32).ravel().copy()
            copy[hidden] = 0
            drops[name] = float(
                row[digit] - model.probabilities(copy.reshape(1, 28, 28, 1))[0][digit]
            )
        top.append(drops["top"])
        random.append(drops["random"])
        wins += drops["top"] > drops["random"]
    return {
        "digits": len(images),
        "mean_drop_top_20": round(float(np.mean(top)), 4),
        "mean_drop_random_20": round(float(np.mean(random)), 4),
        "top_costs_more_share": round(wins / len(images), 3),
    }


def canvas_seven(path: Path) -> None:
    image = Image.new("L", (280, 280), 255)
    draw = ImageDraw.Draw(image)
    draw.line([(70, 60), (210, 60), (120, 230)], fill=0, width=20, joint="curve")
    image.save(path)


def whole_process(ckpt: Path, image: Path, plot: Path | None) -> float:
    command = [sys.executable, "-m", "cnnmnist", "explain", str(image), "--model", str(ckpt)]
    times = []
    for _ in range(5):
        if plot:
            plot.unlink(missing_ok=True)
        started = time.perf_counter()
        subprocess.run(
            command + (["--plot", str(plot)] if plot else []), check=True, capture_output=True
        )
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def page_requests(ckpt: Path, image: Path) -> dict:
    server = subprocess.Popen(
        [sys.executable, "-m", "cnnmnist", "serve", str(ckpt), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    banner = ""
    while "Ctrl-C" not in banner:
        banner += server.stderr.readline()
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", banner).group(1))
    body = image.read_bytes()
    out = {}
    try:
        for path in ("/predict?pixels=1", "/explain"):
            times = []
            for _ in range(51):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                started = time.perf_counter()
                connection.request("POST", path, body, {"Content-Type": "image/png"})
                answer = connection.getresponse().read()
                times.append(time.perf_counter() - started)
                connection.close()
                json.loads(answer)
            times = sorted(times[1:])  # the first /explain makes the explainer
            out[path.split("?")[0]] = {
                "median_ms": round(1000 * statistics.median(times), 1),
                "p90_ms": round(1000 * times[int(0.9 * len(times))], 1),
            }
    finally:
        server.terminate()
        server.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+", type=Path)
    parser.add_argument("--digits", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "explain.json")
    args = parser.parse_args()
    from cnnmnist import data

    images = data.load("mnist").test_images[: args.digits]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "seven.png"
        canvas_seven(image)
        for ckpt in args.ckpts:
            meta = json.loads((ckpt / "cnnmnist.json").read_text())
            row = {
                "preset": meta["preset"],
                "seed": meta["seed"],
                "evidence": evidence_check(ckpt, images),
                "explain_one_image_s": whole_process(ckpt, image, None),
                "explain_with_plot_s": whole_process(ckpt, image, Path(scratch) / "why.png"),
                "page_requests": page_requests(ckpt, image),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {
        "command": "python benchmarks/explain_check.py CKPT ... --digits " + str(args.digits),
        "machine": describe(),
        "checkpoints": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
