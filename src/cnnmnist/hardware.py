"""What this machine offers training (stdlib only): the CPU's flags, native bfloat16, a
oneDNN cap, and so the precision `--precision auto` resolves to."""

from __future__ import annotations

import os

from cnnmnist.errors import UsageError

NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})  # CPU flags of native bfloat16 math
# oneDNN's instruction sets below AVX-512 (values of its ONEDNN_MAX_CPU_ISA). Held to one of
# them on a CPU with native bfloat16, oneDNN refuses the bfloat16 kernels TensorFlow still
# picks there, and training aborts with no message; from AVX512_CORE up it computes them.
ONEDNN_BELOW_AVX512 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"})


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def onednn_cap() -> str | None:
    """ONEDNN_MAX_CPU_ISA, where it holds oneDNN under AVX-512 (else None)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap if cap in ONEDNN_BELOW_AVX512 else None


def resolve_precision(choice: str, flags: set[str], has_gpu: bool, cap: str | None = None) -> str:
    """The Keras dtype policy for --precision; 'auto' picks what this hardware runs fast.

    bfloat16 only where the CPU computes it natively (AVX512-BF16 or AMX), else it is
    emulated and slower than float32; float16 on GPUs (tensor cores). `cap`: oneDNN held
    under AVX-512 (`onednn_cap`), which makes a CPU with native bfloat16 one without it.
    """
    native = bool(flags & NATIVE_BF16)
    if choice == "auto":
        if has_gpu:
            return "mixed_float16"
        return "mixed_bfloat16" if native and not cap else "float32"
    if choice == "bfloat16" and native and cap and not has_gpu:
        raise UsageError(
            f"--precision bfloat16: ONEDNN_MAX_CPU_ISA={cap} holds oneDNN under the bfloat16 "
            "kernels TensorFlow uses on this CPU, and training would abort; use --precision "
            "float32 or auto, or unset ONEDNN_MAX_CPU_ISA"
        )
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[choice]
