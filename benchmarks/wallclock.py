"""Whole-process wall time and peak memory of `cnnmnist` as a user runs it.

Targets: `cnnmnist train --preset fast` reaches 99.0% test accuracy in at most 30 s, start to
exit, for each of 3 seeds, and in at most 0.7 of the time the plain-Keras script a user
would write needs for one epoch of the book's model (benchmarks/plain_keras.py: import, one
epoch, test evaluation, save), the two run alternately, the ratio per precision path; a full
`seed` run
peaks under 1.5 GB; `cnnmnist --help` takes at most 0.3 s, and so does `cnnmnist predict` of
one image with the last fast run's checkpoint (beside the bare interpreter importing numpy).

    python benchmarks/wallclock.py    # fast x 3 seeds beside plain Keras, a full seed run
    python benchmarks/wallclock.py --skip-seed-run   # keep the recorded 15-epoch run
    python benchmarks/wallclock.py --precision float32 --skip-seed-run   # the path of a CPU
                                                     # without native bfloat16
    python benchmarks/wallclock.py --predict-only CKPT   # re-measure predict alone
    python benchmarks/wallclock.py --tiny --out /tmp/w.json   # smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from timing import timed, timed_train

from cnnmnist.hardware import NATIVE_BF16, cpu_flags, onednn_cap, resolve_precision

RESULTS = Path(__file__).parent / "results" / "wallclock.json"
# `fast`, whole process, in at most this share of the plain-Keras script's time for one epoch
# of the book's model: with that margin it stays ahead on the slowest CPU measured.
TARGET_RATIO = 0.7
TINY = ["--epochs", "1", "--train-size", "1024", "--validation-size", "500"]


def cnnmnist() -> list[str]:
    """The installed console script, as a user types it (else `python -m cnnmnist`)."""
    script = shutil.which("cnnmnist")
    return [script] if script else [sys.executable, "-m", "cnnmnist"]


def train(args: list[str], data_dir: Path | None, out: Path | None = None) -> dict:
    run, report = timed_train(cnnmnist(), args, data_dir, out)
    return {
        "args": args,
        "test_accuracy": report["test_accuracy"],
        "seconds": round(run.seconds, 2),
        "peak_rss_mb": run.peak_rss_mb,
    }


def plain_keras(data_dir: Path | None, images: int | None = None) -> dict:
    """benchmarks/plain_keras.py as a user would run it, whole process (on the first
    `images` training images only: a smoke test)."""
    mnist = data_dir or Path(os.environ.get("CNNMNIST_DATA_DIR", ""))
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(__file__).parent / "plain_keras.py"
        command = [sys.executable, str(script), str(mnist), str(Path(tmp) / "model.keras")]
        run = timed(command + ([str(images)] if images else []))
    accuracy = json.loads(run.stdout.strip().splitlines()[-1])["test_accuracy"]
    return {"test_accuracy": round(accuracy, 4), "seconds": round(run.seconds, 2)}


def predict_one_image(ckpt: Path, data_dir: Path | None, scratch: Path, runs: int = 7) -> dict:
    """`cnnmnist predict --model CKPT digit.png`, whole process, beside the bare interpreter
    importing numpy (what any Python tool that reads an image pays) and importing every
    library `predict` cannot do without (its floor on this machine), alternately."""
    from PIL import Image

    from cnnmnist import data

    image = scratch / "digit.png"
    Image.fromarray(data.load("mnist", data_dir, allow_download=False).test_images[0]).save(image)
    command = [*cnnmnist(), "predict", "--model", str(ckpt), str(image)]
    numpy = [sys.executable, "-c", "import numpy"]
    libraries = [
        sys.executable,
        "-c",
        "import numpy, click, rich.console, rich.table\n"
        "from PIL import Image, ImageOps\n"
        "from ai_edge_litert.interpreter import Interpreter\n"
        f"Image.open({str(image)!r}).load()",
    ]
    # All three with compiled bytecode, as an installed package has it (pip compiles it; Python
    # writes it on first import), even where PYTHONDONTWRITEBYTECODE is set: compiling the
    # package's sources on every run is not what a user pays. An untimed run writes it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(scratch / "bytecode")
    for warm_up in (command, numpy, libraries):
        timed(warm_up, env)
    seconds, baseline, floor = [], [], []
    for _ in range(runs):
        seconds.append(round(timed(command, env).seconds, 3))
        baseline.append(round(timed(numpy, env).seconds, 3))
        floor.append(round(timed(libraries, env).seconds, 3))
    return {
        "command": "cnnmnist predict --model CKPT digit.png (CKPT: the last fast run's)",
        "bytecode": "compiled (one untimed run of each first)",
        "runs": seconds,
        "median": statistics.median(seconds),
        "python_importing_numpy": {"runs": baseline, "median": statistics.median(baseline)},
        "python_importing_the_libraries": {
            "what": "numpy, Click, Rich's console and table, Pillow opening the PNG, LiteRT",
            "runs": floor,
            "median": statistics.median(floor),
        },
        "target_seconds": 0.3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="short runs, for a smoke test")
    parser.add_argument(
        "--skip-seed-run", action="store_true", help="keep the full `seed` run recorded in --out"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="the fast runs' --precision (auto: bfloat16 only where the CPU has it natively)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--predict-only",
        type=Path,
        metavar="CKPT",
        help="measure only `predict` of one image, with this checkpoint, and update that "
        "entry of --out",
    )
    args = parser.parse_args()
    tiny = TINY if args.tiny else []
    path = resolve_precision(args.precision, cpu_flags(), has_gpu=False, cap=onednn_cap())
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}

    if args.predict_only:
        with tempfile.TemporaryDirectory() as tmp:
            predict = predict_one_image(args.predict_only, args.data_dir, Path(tmp), 9)
        predict["command"] = f"python benchmarks/wallclock.py --predict-only {args.predict_only}"
        print(f"predict, one image: {predict}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(previous | {"predict_one_image": predict}, indent=2) + "\n")
        return

    fast, keras_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for seed in (1, 2, 3)[: 1 if args.tiny else 3]:
            # Alternately, so that a slow spell of this machine hits both alike.
            keras_runs.append(plain_keras(args.data_dir, 1024 if args.tiny else None))
            print(f"plain Keras, one epoch: {keras_runs[-1]}", flush=True)
            options = ["--preset", "fast", "--seed", str(seed), "--precision", args.precision]
            ckpt = scratch / f"fast-{seed}"
            fast.append(train([*options, *tiny], args.data_dir, ckpt))
            print(f"fast seed {seed}: {fast[-1]}", flush=True)
        predict = predict_one_image(ckpt, args.data_dir, scratch, 2 if args.tiny else 7)
        print(f"predict, one image: {predict}", flush=True)
    ratio = statistics.median(r["seconds"] for r in fast) / statistics.median(
        r["seconds"] for r in keras_runs
    )
    seed_run = None
    if args.skip_seed_run and args.out.exists():
        seed_run = json.loads(args.out.read_text()).get("seed_run")
    elif not args.skip_seed_run:
        seed_run = train(["--preset", "seed", "--seed", "1", *tiny], args.data_dir)
        print(f"seed: {seed_run}", flush=True)
    help_seconds = [round(timed([*cnnmnist(), "--help"]).seconds, 3) for _ in range(5)]
    print(f"--help: {help_seconds} s", flush=True)

    flags = sorted(cpu_flags() & (NATIVE_BF16 | {"avx2", "avx512f"}))
    fast_record = {
        "command": " ".join(["python benchmarks/wallclock.py", *sys.argv[1:]]),  # as run
        "precision_path": path,
        "cpu_flags": flags,
        "onednn_max_cpu_isa": onednn_cap(),  # oneDNN held under AVX-512, if it was
        "runs": fast,
        "plain_keras_one_epoch": keras_runs,
        "ratio_to_plain_keras_one_epoch": round(ratio, 3),
        "target": {"test_accuracy": 0.99, "seconds": 30, "ratio": TARGET_RATIO},
        "within_target": all(r["test_accuracy"] >= 0.99 and r["seconds"] <= 30 for r in fast)
        and ratio <= TARGET_RATIO,
        # The target that holds on every CPU: seconds vary from machine to machine.
        "ratio_within_target": all(r["test_accuracy"] >= 0.99 for r in fast)
        and ratio <= TARGET_RATIO,
    }
    by_path = dict(previous.get("fast_by_precision_path", {}), **{path: fast_record})
    result = {
        "tiny": args.tiny,
        "fast_by_precision_path": by_path,
        "seed_run": seed_run and {**seed_run, "target_peak_rss_mb": 1536},
        "help_seconds": {"runs": help_seconds, "median": statistics.median(help_seconds)},
        "predict_one_image": predict,
        "machine": {"python": platform.python_version(), "processor": platform.processor()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
