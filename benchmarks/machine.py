"""What a benchmark's figures were measured on: the CPU, its cores and the flags that decide
TensorFlow's paths (AVX2, AVX-512, native bfloat16), recorded beside every result."""

from __future__ import annotations

import os
import platform

from cnnmnist.hardware import NATIVE_BF16, cpu_flags, onednn_cap

FLAGS = NATIVE_BF16 | {"avx2", "avx512f"}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """The machine, as every results file records it."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": sorted(cpu_flags() & FLAGS),
        "onednn_max_cpu_isa": onednn_cap(),  # oneDNN held under AVX-512, if it was
        "python": platform.python_version(),
    }
