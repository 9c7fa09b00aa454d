"""Training throughput: plain Keras `model.fit` on float32 arrays vs cnnmnist's own loop.

Alternates the contenders round by round in one process, on the reference `seed` model with
Adam and batch 100, and prints images/s and the ratios. This machine is noisy (whole rounds
run at ~2,600 instead of ~4,400 images/s, for every contender alike), so each round is short,
the order rotates from round to round, and the ratio reported is the median over rounds of
each round's own ratio to plain Keras.

    python benchmarks/throughput.py                 # full: 7 rounds of 20,000 images (~6 min)
    python benchmarks/throughput.py --out benchmarks/results/throughput_without_native_bf16.json
                                                    # on a CPU without native bfloat16 (there
                                                    # the bfloat16 contender is left out)
    python benchmarks/throughput.py --tiny          # a smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "throughput.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="few steps, for a smoke test")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=20000, help="training images per round")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.tiny:
        args.rounds, args.images = 1, 1000

    import keras
    import numpy as np
    import tensorflow as tf

    from cnnmnist import data, hardware, presets
    from cnnmnist.training import loop, network

    ds = data.load("mnist", args.data_dir)
    x, y = ds.split("train", 5000)
    x, y = x[: args.images], y[: args.images]
    recipe = presets.get("seed")
    batch = recipe.batch_size
    strategy = tf.distribute.get_strategy()  # what `cnnmnist train` uses on one device

    def plain_keras() -> float:
        keras.mixed_precision.set_global_policy("float32")
        net = network.compiled(recipe)
        xf = x.reshape(-1, 28, 28, 1).astype(np.float32)  # what a plain port feeds
        net.fit(xf[: batch * 2], y[: batch * 2], batch_size=batch, epochs=1, verbose=0)  # warm up
        start = time.perf_counter()
        net.fit(xf, y, batch_size=batch, epochs=1, verbose=0)
        return len(x) / (time.perf_counter() - start)

    def ours(policy: str):
        def run() -> float:
            keras.mixed_precision.set_global_policy(policy)
            try:
                trainer = loop.Loop(network.compiled(recipe), strategy, batch)
                trainer.fit_arrays(x[: batch * 2], y[: batch * 2], 0, range(1))  # warm up
                start = time.perf_counter()
                trainer.fit_arrays(x, y, 0, range(1))
                return len(x) // batch * batch / (time.perf_counter() - start)
            finally:
                keras.mixed_precision.set_global_policy("float32")

        return run

    contenders = {
        "plain_keras_float32": plain_keras,
        "cnnmnist_float32": ours("float32"),
        "cnnmnist_bfloat16": ours("mixed_bfloat16"),
    }
    native = hardware.cpu_flags() & hardware.NATIVE_BF16
    if (native and hardware.onednn_cap()) or (not native and not args.tiny):
        # Emulated bfloat16 runs several times slower than float32, and `--precision auto`
        # never picks it on such a CPU. A tiny run keeps it: the smoke test covers its code.
        # On a CPU with native bfloat16 and oneDNN held under AVX-512 it would abort, as
        # hardware.resolve_precision refuses it.
        del contenders["cnnmnist_bfloat16"]
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(args.rounds):
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:  # rotate who goes first
            samples[name].append(contenders[name]())
            print(f"round {round_ + 1}: {name:22s} {samples[name][-1]:8.0f} images/s", flush=True)
    median = {name: statistics.median(v) for name, v in samples.items()}
    base = samples["plain_keras_float32"]
    ratios = {
        name: statistics.median(v / b for v, b in zip(samples[name], base, strict=True))
        for name in names
    }
    result = {
        "tiny": args.tiny,
        "images_per_round": len(x),
        "rounds": args.rounds,
        "batch_size": batch,
        "images_per_second": {name: round(v, 1) for name, v in median.items()},
        "samples": {name: [round(s, 1) for s in v] for name, v in samples.items()},
        "ratio_vs_plain_keras": {name: round(v, 3) for name, v in ratios.items()},
        "ratio_of_medians": {
            name: round(v / median["plain_keras_float32"], 3) for name, v in median.items()
        },
        "targets": {"cnnmnist_float32": 1.25, "cnnmnist_bfloat16": 2.0},
        "command": " ".join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "bf16": sorted(hardware.cpu_flags() & hardware.NATIVE_BF16),
        },
        "versions": {"keras": keras.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_vs_plain_keras"], indent=2))


if __name__ == "__main__":
    main()
