"""The W8A8 linear on x86 CPUs whose int8 instructions saturate (AVX2 without VNNI): `cpu_int16.cpp`.

Why a kernel of our own: on such CPUs oneDNN's int8 GEMM adds two u8 x s8 products in saturating int16,
which is wrong for 8-bit x 8-bit codes, so its exact route for W8 runs the GEMM twice (weights split in
4-bit halves, `onednn.py`), and `torch._int_mm` has no fast CPU kernel at all. `vpmaddwd` multiplies int16
pairs and adds them in int32, exactly; per instruction pair it does twice the multiply-adds of an fp32 FMA.
`benchmarks/cpu_mac_peak.py` measures the bound of each route here (the int16 microkernel runs at about
1.2-1.4x the fp32 one, the split at 0.9x) and `benchmarks/speed_cpu.py` the layers and the model.

The kernel quantizes the activations per token, runs the GEMM and the fp32 epilogue in one call, bit for
bit as the torch path (`torch_ops.linear_int`; tests/unit/test_cpu_int16.py). Weights are packed once per
weight tensor into int16 panels with the zero points folded in (2 bytes per weight, cached like oneDNN's
packed copy, `weight_cache`).

Group-wise weight scales (`linear_grouped`, W8 and W4) run on the same GEMM: each group's exact int32 sum is
converted to fp32, scaled and added in the torch path's order, so there too the result is bit for bit
`torch_ops.linear_int` (tests/unit/test_cpu_group.py); the torch path runs one GEMM per group instead.

Built by `kernels.warmup()` (`cpu_build`: once per machine, torch install and checkout, about a minute). Needs a
C++ compiler and ninja; where the build fails, a warning names the reason and 8-bit weights stay on oneDNN's split
route.
"""

from __future__ import annotations

import torch

from ..quant.formats import unpack_int4
from . import cpu_build, weight_cache

MAX_K = (2**31 - 1) // (128 * 255)  # the int32 accumulator holds K products of |code| <= 128, |w - zero| <= 255


NAME = "viditq_cpu_int16"


def build():
    """Build (first time on this machine) or load the extension; None where it cannot (warned once)."""
    return cpu_build.build(NAME, "cpu_int16.cpp", "the int16 CPU kernel for W8A8 and group-wise weights",
                           "W8A8 on this CPU falls back to oneDNN's slower split route, group-wise weights to the "
                           "torch route")


def extension():
    """The extension module once `build` (`kernels.warmup`) loaded it, else None."""
    return cpu_build.loaded(NAME)


def available() -> bool:
    return extension() is not None


def missing_reason() -> str | None:
    """Why the extension is not loaded here, or None where it is."""
    return cpu_build.missing_reason(NAME)


def packed_weight(qweight: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """int16 panels of `qweight - zero` (int8 codes `[N, K]`; `zero [N, 1]`, `[1, 1]` or None), cached."""
    def build():
        z = None if zero is None else zero.reshape(-1).expand(qweight.shape[0]).contiguous()
        return extension().pack_weight(qweight, z)
    return weight_cache.packed("cpu_int16", qweight, zero, build)


def linear_int16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 with per-token activations on a 2-D `x [M, K]`, per-channel (`scale [N, 1]`) or per-tensor
    (`[1, 1]`) weights: `torch_ops.linear_int(x, qweight, scale, zero, bias, 8)`, bit for bit, in x's dtype."""
    n = qweight.shape[0]
    y = extension().linear(x.to(torch.float32), packed_weight(qweight, zero), n,
                           scale.reshape(-1).expand(n), bias)
    return y.to(x.dtype)


def packed_grouped_weight(qweight: torch.Tensor, weight_bits: int, in_features: int, groups: int,
                          zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight in the layout `linear_grouped` runs now, cached per layer weight (`qweight`: int8 codes, or W4
    codes packed two per byte; `zero [N, G]` or None): int8 panels and their correction for `vpdpbusd` where the
    microkernel is VNNI's and `code - zero` fits int8 (W4, or W8 without zero points) in groups of a multiple of 4,
    else int16 panels of `code - zero` and None."""
    int8 = (extension().microkernel("") == "vnni" and (weight_bits == 4 or zero is None)
            and (in_features // groups) % 4 == 0)

    def build():
        codes = unpack_int4(qweight, in_features) if weight_bits == 4 else qweight
        z = None if zero is None else zero.expand(codes.shape[0], -1).contiguous()
        if int8:
            packed, correction = extension().pack_weight_s8(codes, z, groups)
            return packed, correction
        return extension().pack_weight(codes, z), None
    kind = f"cpu_int16_group_w{weight_bits}_{'s8' if int8 else 's16'}"
    return weight_cache.packed(kind, qweight, zero, build)


def linear_grouped(x: torch.Tensor, qweight: torch.Tensor, weight_bits: int, scale: torch.Tensor,
                   zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 or W4A8 with per-token activations and group-wise weights (`scale [N, G]`, an even group size) on a
    2-D `x [M, K]`: `torch_ops.linear_int(x, codes, scale, zero, bias, 8)`, bit for bit, in x's dtype."""
    n, groups = qweight.shape[0], scale.shape[1]
    packed, correction = packed_grouped_weight(qweight, weight_bits, x.shape[1], groups, zero)
    y = extension().linear_grouped(x.to(torch.float32), packed, n, scale.expand(n, -1), bias, correction)
    return y.to(x.dtype)
