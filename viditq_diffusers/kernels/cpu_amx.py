"""W8A8 and W4A8 on Intel CPUs with AMX (Sapphire Rapids and later): our own int8 GEMM on the AMX tiles, with
the epilogue fused (`cpu_amx.cpp`), two calls in all:

1. `quantize_s8`: per-token quantization to int8 codes (padded to the tiles), with their row sums;
2. `gemm`: `tdpbssd` on 32 x 32 output blocks (exact int32 sums), then, while the block is in cache,
   `(float(acc - rowsum zero) * w_scale) * x_scale + bias` written in fp32 or bf16.

Why not oneDNN's int8 GEMM here (`cpu_direct`): it returns fp32 sums, so the zero points, the per-token scales
and the cast to bf16 take another pass over the whole output, which costs about what AMX saves over bf16
(benchmarks/speed_cpu.py); oneDNN's per-tensor activation scale cannot take per-token scales.

Bit for bit the torch path (`torch_ops.linear_int`; tests/unit/test_cpu_amx.py): the same codes and scales
(`cpu_quantize.h`), exact int32 sums, and the epilogue's float steps in torch's order. W4 weights are
unpacked to int8 codes once, into the tile layout, cached per weight like the other kernels' layouts
(1 byte per weight).
"""

from __future__ import annotations


import torch

from ..quant.formats import unpack_int4
from . import cpu_build, weight_cache
from .cpu_flags import cpu_model_and_flags


def cpu_has_amx() -> bool:
    """AMX-INT8 in /proc/cpuinfo (Linux, which the tiles need anyway): only then is the kernel worth building."""
    return {"amx_tile", "amx_int8"} <= cpu_model_and_flags()[1]


NAME = "viditq_cpu_amx"


def build():
    """Build (first time on this machine) or load the extension where this CPU has AMX; else None."""
    if not cpu_has_amx():
        return None
    return cpu_build.build(NAME, "cpu_amx.cpp", "the AMX int8 GEMM",
                           "quantized layers on this CPU use oneDNN's int8 GEMM instead")


def extension():
    """The extension module once `build` (`kernels.warmup`) loaded it, else None."""
    return cpu_build.loaded(NAME)


def missing_reason() -> str | None:
    """Why the AMX kernel cannot run here, or None where it can."""
    if not cpu_has_amx():
        return "no AMX on this CPU"
    reason = cpu_build.missing_reason(NAME)
    if reason is None and not extension().amx_ready():  # e.g. the kernel refuses the process the tile state
        return "the OS does not let this process use the AMX tiles"
    return reason


def available() -> bool:
    return missing_reason() is None


def packed_weight(qweight: torch.Tensor, weight_bits: int, in_features: int) -> torch.Tensor:
    """The int8 codes of `qweight` in the tile layout, cached per weight tensor."""
    return weight_cache.packed("amx", qweight, None, lambda: extension().pack_weight(
        unpack_int4(qweight, in_features) if weight_bits == 4 else qweight.contiguous()))


def linear_amx(x: torch.Tensor, qweight: torch.Tensor, weight_bits: int, scale: torch.Tensor,
               zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 or W4A8 with per-token activations on a 2-D `x [M, K]`, per-channel (`scale [N, 1]`) or per-tensor
    (`[1, 1]`) weights, symmetric or not: `torch_ops.linear_int` on the codes, bit for bit, in x's dtype."""
    ext = extension()
    via_fp32 = x.dtype not in (torch.float32, torch.bfloat16)  # the C++ reads and writes these two
    codes, x_scale, rowsum = ext.quantize_s8(x.float() if via_fp32 else x)
    packed = packed_weight(qweight, weight_bits, x.shape[1])
    y = ext.gemm(codes, x_scale, rowsum, packed, qweight.shape[0], zero, scale, bias, x.dtype == torch.bfloat16)
    return y.to(x.dtype) if via_fp32 else y
