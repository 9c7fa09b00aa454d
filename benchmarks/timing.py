"""Run one command as a user would, timed from start to exit, with its own peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: int
    stdout: str


def timed(cmd: list[str], env: dict[str, str] | None = None) -> Timed:
    """Run `cmd` to completion (in `env`, else this environment); exit with its stderr's
    tail if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
        start = time.perf_counter()
        with open(stdout, "w") as out, open(stderr, "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{stderr.read_text()[-2000:]}")
        return Timed(seconds, round(usage.ru_maxrss / 1024), stdout.read_text())


def timed_train(
    program: list[str], args: list[str], data_dir: Path | None, out: Path | None = None
) -> tuple[Timed, dict]:
    """`PROGRAM train ARGS --out OUT --json`, timed: the run and its parsed report (OUT: a
    scratch directory, removed after, unless given)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*program, "train", *args, "--out", str(out or Path(tmp) / "ckpt"), "--json"]
        run = timed(cmd + (["--data-dir", str(data_dir)] if data_dir else []))
    return run, json.loads(run.stdout)
