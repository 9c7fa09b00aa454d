"""Choose the `best` recipe on the 5,000 validation images, never on the test set.

Each candidate is `cnnmnist train --preset best` with its flags, on the 55,000 training
images, seed 1; what is recorded is its validation accuracy after every epoch. The test
accuracy the CLI prints is not recorded. The chosen recipe then trains the final runs
(`reproduce.py --only best`) on all 60,000 images and reports the test set once.

    python benchmarks/choose_best.py                # every candidate (about 12-15 min each)
    python benchmarks/choose_best.py --only ls18    # re-run one candidate
    python benchmarks/choose_best.py --tiny --out /tmp/c.json   # smoke test: the last candidate
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from timing import timed_train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "choose_best.json"
SEED = 1
VALIDATION = ["--validation-size", "5000"]
# name, flags on top of --preset best
CANDIDATES = [
    ("base15", ["--epochs", "15", "--label-smoothing", "0"]),
    ("ls18", ["--epochs", "18", "--label-smoothing", "0.1"]),
    # The length that fitted 20 minutes a run in float32 on 2 cores, on the earlier network.
    ("ls7", ["--epochs", "7", "--label-smoothing", "0.1"]),
    # Today's network (strided first and last layers, no pooling) and length.
    ("strided15", ["--epochs", "15", "--label-smoothing", "0.1"]),
]
# Every result but "strided15" was recorded on the earlier network (four 3x3 convolutions,
# max pooling after the second and fourth); "ul7" had the user-like augmentation, the others
# not yet. A candidate re-run now trains today's model.
TINY = ["--epochs", "1", "--train-size", "1000", "--validation-size", "500"]


def run_once(flags: list[str], tiny: bool, data_dir: Path | None) -> dict:
    """One validation run in a subprocess: validation accuracy per epoch, wall minutes."""
    args = ["--preset", "best", *flags, *VALIDATION, "--seed", str(SEED)]
    args += TINY if tiny else []  # later flags win
    run, report = timed_train([sys.executable, "-m", "cnnmnist"], args, data_dir)
    history = report["history"]
    return {
        "flags": flags,
        "seed": SEED,
        "val_accuracy": [round(epoch["val_accuracy"], 4) for epoch in history],
        "minutes": round(run.seconds / 60, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[c[0] for c in CANDIDATES])
    parser.add_argument("--tiny", action="store_true", help="one short run per candidate")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    # A smoke test runs one candidate: each is the same script path with other flags.
    candidates = CANDIDATES[-1:] if args.tiny and not args.only else CANDIDATES
    for name, flags in candidates:
        if (args.only and name != args.only) or (name in results and not args.only):
            continue  # finished earlier: reuse
        results[name] = run_once(flags, args.tiny, args.data_dir)
        print(f"{name:8s} final validation accuracy {results[name]['val_accuracy'][-1]:.4f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
