"""`quant.channel_balance.balance_activation` on CPU with the rotation's elementwise part in C++ (`cpu_balance.cpp`).

The torch version runs the fast Walsh-Hadamard transform as a dozen whole-tensor ops (a reshape, a stack, an
add and a sub per bit of the channel index): 4-8 ms for a [512, 1152] activation on a 2-core CPU, several
times the quantized GEMM it feeds. The C++ pass does the input scale and every butterfly on one row at a time
while it is in cache, rounding each step to x's dtype as torch does, so the result has the same bits. The
dense `H_p` factor (orders like 1152 = 36 x 32) stays the same torch matmul on the same layout as
`hadamard.rotate`, and the smoothing the same torch multiply: their bits cannot change either.
"""

from __future__ import annotations

import torch

from ..quant import channel_balance, hadamard
from . import cpu_build


NAME = "viditq_cpu_balance"


def build():
    """Build (first time on this machine) or load the extension; None where it cannot (warned once)."""
    return cpu_build.build(NAME, "cpu_balance.cpp", "the CPU Hadamard rotation",
                           "rotated layers on this CPU rotate with torch ops")


def extension():
    """The extension module once `build` (`kernels.warmup`) loaded it, else None."""
    return cpu_build.loaded(NAME)


def available() -> bool:
    return extension() is not None


def missing_reason() -> str | None:
    """Why the extension is not loaded here, or None where it is."""
    return cpu_build.missing_reason(NAME)


def balance_activation(x: torch.Tensor, smooth: torch.Tensor | None, rotation_seed: int | None) -> torch.Tensor:
    """`channel_balance.balance_activation(x, smooth, rotation_seed)`, bit for bit, for a 2-D fp32 or bf16 CPU `x`."""
    x = channel_balance.balance_activation(x, smooth, None)  # the smoothing (validated), or x itself
    if rotation_seed is None:
        return x
    m, n = x.shape
    pow2, scale, dense = hadamard.rotation_factors(n, rotation_seed, x.dtype, x.device)
    y = extension().scale_and_fwht(x, scale, pow2)
    if dense is not None:  # as hadamard.rotate: the same op on the same layout, so the same bits
        y = (y.reshape(m, n // pow2, pow2).transpose(-1, -2) @ dense).transpose(-1, -2)
    return y.reshape(m, n)
