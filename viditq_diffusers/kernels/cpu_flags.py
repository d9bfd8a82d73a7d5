"""What this CPU is, as the kernel routes see it: its model name and instruction-set flags, read once.

The C++ kernels dispatch at run time and the routes pick by these flags (AVX2, AVX-512 VNNI, AMX, ...), so the
flags name a kind of machine: `cpu_amx` builds only where AMX is listed, and a cost table measured on one kind
is refused on another (`mixed_precision.cost`).
"""

from __future__ import annotations

import functools
import platform

# the flags that pick a kernel route or a kernel's inner loop (routes.py, cpu_build.py, the C++ dispatch)
ROUTE_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
               "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """(CPU model name, every flag of its first core) from /proc/cpuinfo (x86 "flags", ARM "Features"); the
    platform's name and no flags where there is no /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model name") and name in (platform.processor(), platform.machine(), ""):
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return name, flags


def route_flags() -> list[str]:
    """The `ROUTE_FLAGS` this CPU has, sorted."""
    return sorted(f for f in ROUTE_FLAGS if f in cpu_model_and_flags()[1])
