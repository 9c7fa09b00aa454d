"""Whole-process wall time and peak memory of `cnnmnist` as a user runs it.

Goals (issue "Fast"): `cnnmnist train --preset fast` reaches 99.0% test accuracy in at most
30 s, start to exit, for each of 3 seeds; a full `seed` run peaks under 1.5 GB;
`cnnmnist --help` takes at most 0.3 s.

    python benchmarks/wallclock.py    # fast x 3 seeds, a full seed run, --help x 5 (~10 min)
    python benchmarks/wallclock.py --skip-seed-run   # keep the recorded 15-epoch run (~2 min)
    python benchmarks/wallclock.py --tiny --out /tmp/w.json   # smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
from pathlib import Path

from timing import timed, timed_train

RESULTS = Path(__file__).parent / "results" / "wallclock.json"
TINY = ["--epochs", "1", "--train-size", "1024", "--validation-size", "500"]


def cnnmnist() -> list[str]:
    """The installed console script, as a user types it (else `python -m cnnmnist`)."""
    script = shutil.which("cnnmnist")
    return [script] if script else [sys.executable, "-m", "cnnmnist"]


def train(args: list[str], data_dir: Path | None) -> dict:
    run, report = timed_train(cnnmnist(), args, data_dir)
    return {
        "args": args,
        "test_accuracy": report["test_accuracy"],
        "seconds": round(run.seconds, 2),
        "peak_rss_mb": run.peak_rss_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="short runs, for a smoke test")
    parser.add_argument(
        "--skip-seed-run", action="store_true", help="keep the full `seed` run recorded in --out"
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tiny = TINY if args.tiny else []

    fast = []
    for seed in (1, 2, 3)[: 1 if args.tiny else 3]:
        fast.append(train(["--preset", "fast", "--seed", str(seed), *tiny], args.data_dir))
        print(f"fast seed {seed}: {fast[-1]}", flush=True)
    seed_run = None
    if args.skip_seed_run and args.out.exists():
        seed_run = json.loads(args.out.read_text()).get("seed_run")
    elif not args.skip_seed_run:
        seed_run = train(["--preset", "seed", "--seed", "1", *tiny], args.data_dir)
        print(f"seed: {seed_run}", flush=True)
    help_seconds = [round(timed([*cnnmnist(), "--help"]).seconds, 3) for _ in range(5)]
    print(f"--help: {help_seconds} s", flush=True)

    result = {
        "tiny": args.tiny,
        "fast": {
            "runs": fast,
            "goal": {"test_accuracy": 0.99, "seconds": 30},
            "met": all(r["test_accuracy"] >= 0.99 and r["seconds"] <= 30 for r in fast),
        },
        "seed_run": seed_run and {**seed_run, "goal_peak_rss_mb": 1536},
        "help_seconds": {"runs": help_seconds, "median": statistics.median(help_seconds)},
        "machine": {"python": platform.python_version(), "processor": platform.processor()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
