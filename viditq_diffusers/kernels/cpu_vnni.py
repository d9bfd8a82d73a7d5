"""W8A8 and W4A8 on x86 CPUs with AVX-512 VNNI and no AMX (e.g. AMD Zen 4, Intel Ice Lake / Cascade Lake): our own
int8 GEMM on `vpdpbusd`, with per-token quantization and the epilogue fused (`cpu_vnni.cpp`), one call:

1. the activations quantized per token into s8 panels of 8 rows, with their code sums;
2. `vpdpbusd` on 8 x 48 register tiles over the whole K (exact int32 sums), weights as u8 `code + 128`;
3. while the tile is in registers: `((float)(acc - rowsum zero) * w_scale) * x_scale + bias`, the u8 offset taken
   off with the zero point, written in fp32 or bf16.

Why not oneDNN's int8 GEMM here (`cpu_direct`, the next route): it returns fp32 sums, so the zero points, the
per-token scales and the cast to bf16 take another pass over the whole output, and the quantization a third
(benchmarks/speed_cpu.py).

Bit for bit the torch path (`torch_ops.linear_int`; tests/unit/test_cpu_vnni.py): the same codes and scales as
`cpu_quantize.h` (NaN and Inf rows included), exact int32 sums, and the epilogue's float steps in torch's order.
W4 weights are unpacked to int8 codes once, into the panel layout, cached per weight like the other kernels'
layouts (1 byte per weight).
"""

from __future__ import annotations

import torch

from ..quant.formats import unpack_int4
from . import cpu_build, weight_cache
from .cpu_flags import cpu_model_and_flags

NAME = "viditq_cpu_vnni"
FLAGS = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni"}  # what the kernel's target needs


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI (and the AVX-512 subsets the kernel uses) in /proc/cpuinfo: only then is it worth building."""
    return FLAGS <= cpu_model_and_flags()[1]


def build():
    """Build (first time on this machine) or load the extension where this CPU has AVX-512 VNNI; else None."""
    if not cpu_has_vnni():
        return None
    return cpu_build.build(NAME, "cpu_vnni.cpp", "the AVX-512 VNNI int8 GEMM",
                           "quantized layers on this CPU use oneDNN's int8 GEMM instead")


def extension():
    """The extension module once `build` (`kernels.warmup`) loaded it, else None."""
    return cpu_build.loaded(NAME)


def missing_reason() -> str | None:
    """Why the VNNI kernel cannot run here, or None where it can."""
    if not cpu_has_vnni():
        return "no AVX-512 VNNI on this CPU"
    reason = cpu_build.missing_reason(NAME)
    if reason is None and not extension().vnni_ready():  # listed, but the OS does not save the zmm registers
        return "the OS does not enable AVX-512 for this process"
    return reason


def available() -> bool:
    return missing_reason() is None


def packed_weight(qweight: torch.Tensor, weight_bits: int, in_features: int) -> torch.Tensor:
    """The codes of `qweight` as u8 `code + 128` in the kernel's panel layout, cached per weight tensor."""
    return weight_cache.packed("vnni", qweight, None, lambda: extension().pack_weight(
        unpack_int4(qweight, in_features) if weight_bits == 4 else qweight.contiguous()))


def linear_vnni(x: torch.Tensor, qweight: torch.Tensor, weight_bits: int, scale: torch.Tensor,
                zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 or W4A8 with per-token activations on a 2-D `x [M, K]`, per-channel (`scale [N, 1]`) or per-tensor
    (`[1, 1]`) weights, symmetric or not: `torch_ops.linear_int` on the codes, bit for bit, in x's dtype."""
    via_fp32 = x.dtype not in (torch.float32, torch.bfloat16)  # the C++ reads and writes these two
    packed = packed_weight(qweight, weight_bits, x.shape[1])
    y = extension().linear(x.float() if via_fp32 else x, packed, qweight.shape[0], zero, scale, bias)
    return y.to(x.dtype) if via_fp32 else y
