"""Run one command as a user would, timed from start to exit, with its own peak memory."""

from __future__ import annotations

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


def timed(cmd: list[str]) -> Timed:
    """Run `cmd` to completion; exit with its stderr's tail if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        stdout, stderr = Path(tmp) / "stdout", Path(tmp) / "stderr"
        start = time.perf_counter()
        with open(stdout, "w") as out, open(stderr, "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{stderr.read_text()[-2000:]}")
        return Timed(seconds, round(usage.ru_maxrss / 1024), stdout.read_text())
