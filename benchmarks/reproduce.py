"""Reproduce the reference chapter's results table through the real CLI, with several seeds.

Each row is a `configs/*.toml` run; each run is `cnnmnist train --config ... --seed N --json`
in a subprocess, timed from start to exit. Results are saved after every run, so an
interrupted reproduction continues where it stopped (finished runs are reused).

    python benchmarks/reproduce.py                  # every row, seeds 1 2 3 (hours)
    python benchmarks/reproduce.py --only seed-rmsprop   # re-run one row from scratch
    python benchmarks/reproduce.py --only best --keep /tmp/ckpts  # and keep its checkpoints
    python benchmarks/reproduce.py --tiny --out /tmp/r.json   # smoke test: 1 short run per row
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from timing import timed_train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reproduce.json"
README = ROOT / "docs" / "results.md"  # holds the table between the markers
NAMES = ["seed-adam", "seed-rmsprop", "seed-rmsprop-tf1", "seed-layers", "mlp", "best"]


def book(config: str) -> float | None:
    """The book's test accuracy for a run file's preset and optimizer (None: no reference)."""
    from cnnmnist import presets

    values = presets.load_config(ROOT / config)
    recipe = presets.get(values["preset"]).with_overrides(
        **{k: v for k, v in values.items() if k in presets.TUNABLE}
    )
    return presets.book_accuracy(recipe.name, recipe.optimizer)


# name, config, the book's test accuracy (None: no reference)
ROWS = [(name, f"configs/{name}.toml", book(f"configs/{name}.toml")) for name in NAMES]
TINY = ["--epochs", "1", "--train-size", "1000", "--validation-size", "500"]
START, END = "<!-- reproduce:start -->", "<!-- reproduce:end -->"


def run_once(
    config: str, seed: int, tiny: bool, data_dir: Path | None, out: Path | None = None
) -> dict:
    """One `cnnmnist train` in a subprocess: its test accuracy, wall minutes and peak memory
    (its checkpoint kept at `out`, if given)."""
    args = ["--config", str(ROOT / config), "--seed", str(seed), *(TINY if tiny else [])]
    run, report = timed_train([sys.executable, "-m", "cnnmnist"], args, data_dir, out)
    return {
        "seed": seed,
        "test_accuracy": report["test_accuracy"],
        "minutes": round(run.seconds / 60, 2),
        "epochs": report["epochs"],
        "peak_rss_mb": run.peak_rss_mb,
    }


def summary(row: dict) -> dict:
    accs = [r["test_accuracy"] for r in row["runs"]]
    return {
        "mean": statistics.fmean(accs) if accs else None,
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs, default=None),
        "max": max(accs, default=None),
        "minutes": statistics.fmean(r["minutes"] for r in row["runs"]) if accs else None,
    }


def markdown(results: dict) -> str:
    lines = [
        "| run | config | book | ours: mean ± std | min | max | seeds | minutes/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        s = summary(row)
        if s["mean"] is None:
            continue
        ref = f"{row['reference']:.2%}" if row["reference"] else "-"
        lines.append(
            f"| {row['name']} | `{row['config']}` | {ref} | {s['mean']:.2%} ± {s['std']:.2%} | "
            f"{s['min']:.2%} | {s['max']:.2%} | {len(row['runs'])} | {s['minutes']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--only", choices=[r[0] for r in ROWS], help="re-run this row only")
    parser.add_argument("--tiny", action="store_true", help="one short run per row (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep each run's checkpoint as DIR/ROW-seedN"
    )
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.tiny else args.seeds
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)

    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    by_name = {row["name"]: row for row in results["rows"]}
    rows = []
    for name, config, reference in ROWS:
        row = by_name.get(name, {"runs": []})
        row.update(name=name, config=config, reference=reference)
        if name == args.only:
            row["runs"] = []
        rows.append(row)
    results = {"tiny": args.tiny, "rows": rows}
    for row in rows:
        if args.only and row["name"] != args.only:
            continue
        for seed in seeds:
            if any(r["seed"] == seed for r in row["runs"]):
                continue  # finished earlier: reuse
            keep = args.keep / f"{row['name']}-seed{seed}" if args.keep else None
            run = run_once(row["config"], seed, args.tiny, args.data_dir, keep)
            row["runs"].append(run)
            print(
                f"{row['name']:18s} seed {seed}: {run['test_accuracy']:.4f} "
                f"({run['minutes']:.1f} min)",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    if not args.tiny and args.out == RESULTS and START in README.read_text():
        text = README.read_text()
        head, rest = text.split(START, 1)
        README.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
