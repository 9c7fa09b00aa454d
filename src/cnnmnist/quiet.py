"""Keeping TensorFlow's native start-up chatter off the user's terminal (`-v` shows it).

TensorFlow's C++ runtime and LiteRT log to file descriptor 2 whatever Python says
(absl's pre-init warning, CUDA probes on a CPU machine, oneDNN notes, XNNPACK). Those
writes go through a small filter process that drops the known routine lines and passes
everything else, so a real failure (a traceback, an unknown error line, a crash message)
still reaches the user. Python's own stderr (progress bars, messages) bypasses the filter.
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys

# Routine lines only: informational and warning lines in absl's format, and error lines
# from the CUDA probes that every CPU-only machine prints.
NOISE = re.compile(
    r"(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|E\d{4} [\d:.]+ +\d+ (cuda_platform|cuda_dnn|cuda_fft|cuda_blas|cuda_executor)\.cc:\d+\] "
    r"|INFO: Created TensorFlow Lite XNNPACK delegate"
    r"|To enable the following instructions:"
    r"|This TensorFlow binary is optimized"
    r"|WARNING:tensorflow:Using CollectiveAllReduceStrategy eagerly)"
)
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run; this ends at EOF
noise = re.compile(sys.argv[1])
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not noise.match(line.decode("utf-8", "replace")):
        out.write(line)
        out.flush()
"""


def filter_native_stderr() -> None:
    """From now on, drop routine native log lines from file descriptor 2 (once; only when
    sys.stderr is that descriptor, so never inside a test runner's captured streams)."""
    try:
        if sys.stderr.fileno() != 2 or getattr(filter_native_stderr, "installed", False):
            return
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    real = os.dup(2)
    sieve = subprocess.Popen(
        [sys.executable, "-c", _FILTER, NOISE.pattern],
        stdin=subprocess.PIPE,
        stdout=real,
        start_new_session=True,  # not in the terminal's process group: Ctrl-C is not for it
    )
    os.dup2(sieve.stdin.fileno(), 2)  # native writes: through the filter
    # Python's own writes go straight to the terminal.
    sys.stderr = open(real, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    filter_native_stderr.installed = True

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # the last writes of the interpreter go straight out
        sieve.stdin.close()
        try:
            sieve.wait(timeout=5)
        except subprocess.TimeoutExpired:
            sieve.kill()

    atexit.register(drain)
