"""Channel balancing on CPU in C++ (`cpu_balance.cpp`): `quant.channel_balance.balance_activation_kernel_order`,
bit for bit, for a 2-D fp32 or bf16 CPU input.

One pass per row does the whole of it while the row is in cache: the smoothing multiply, the rotation's input
scale, the dense `H_p` factor (orders like 1152 = 36 x 32) as a sequential fp32 sum over the `p` axis, and the
fast Walsh-Hadamard transform over each run of `2^k` channels, rounding each step to x's dtype as the torch
reference does. The torch ops of the reference take a dozen whole-tensor passes and, for the `H_p` factor,
`p` more; a torch matmul would be faster but sums in an unspecified order, so no kernel could match its bits.
The per-token quantization that follows stays in the GEMM kernels (they take the float rows).
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


def balance_activation(x: torch.Tensor, smooth: torch.Tensor | None, rotation_seed: int | None,
                       allow_avx512: bool = True) -> torch.Tensor:
    """`channel_balance.balance_activation_kernel_order(x, smooth, rotation_seed)`, bit for bit, for a 2-D fp32 or
    bf16 CPU `x` (`balance_reason` is None). `allow_avx512=False` runs the AVX2 code on any CPU (tests)."""
    if smooth is not None:
        channel_balance.check_smoothing(smooth, x.shape[-1])
    if rotation_seed is None:  # smoothing alone: one torch multiply is as fast
        return channel_balance.balance_activation_kernel_order(x, smooth, None)
    pow2, scale, dense = hadamard.rotation_factors(x.shape[1], rotation_seed, x.dtype, x.device)
    empty = scale[:0]
    smooth = empty if smooth is None else smooth.to(dtype=x.dtype)
    return extension().balance(x, smooth, scale, empty if dense is None else dense.T, pow2, allow_avx512)
