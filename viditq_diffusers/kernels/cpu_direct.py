"""W4A8 on x86 CPUs, and W8A8 on those with VNNI or AMX: oneDNN's direct int8 GEMM between our C++
quantization and epilogue, three calls in all.

There oneDNN's u8 x s8 GEMM accumulates exactly in int32 (`onednn.exact_for`), but it ignores weight zero
points, and asymmetric 8-bit weights (the default) do not fit int8 once the zero point is folded in. So the
GEMM runs on the raw codes and the zero points come back in the epilogue, with the row sums of the activation
codes: `acc - rowsum[m] * zero[n]`. This replaces oneDNN's split route (two 4-bit halves, twice the GEMM)
and, for W4 too (whose `code - zero` oneDNN's packing takes), the dozen torch ops around the GEMM:

1. `quantize_u8` (C++, `cpu_direct.cpp`): per-token quantization straight to the offset-binary u8 oneDNN
   takes, with the row sums;
2. oneDNN's GEMM (`onednn.gemm_u8`), scales 1, so it returns each integer sum as fp32;
3. `zero_point_epilogue` (C++): `((float)(acc - rowsum zero) * w_scale) * x_scale + bias`, the difference
   formed exactly, written in fp32 or bf16.

Bit for bit the torch path (`torch_ops.linear_int`; tests/unit/test_cpu_direct.py): quantization and epilogue take
its float steps in its order, and oneDNN's fp32 sums are the exact integers wherever they are below 2^24 in
magnitude (a sum that rounded cannot come out below), which the epilogue checks; the rare rows with a larger
sum (codes near their limits over a long K) run the torch path.
"""

from __future__ import annotations

import torch

from ..quant.formats import unpack_int4
from . import cpu_build, onednn
from .torch_ops import linear_int


NAME = "viditq_cpu_direct"


def build():
    """Build (first time on this machine) or load the extension; None where it cannot (warned once)."""
    return cpu_build.build(NAME, "cpu_direct.cpp", "the quantization and epilogue of oneDNN's direct int8 route",
                           "quantized layers on this CPU keep torch ops around oneDNN's GEMM (8-bit weights its "
                           "slower split route)")


def extension():
    """The extension module once `build` (`kernels.warmup`) loaded it, else None."""
    return cpu_build.loaded(NAME)


def available() -> bool:
    return extension() is not None


def missing_reason() -> str | None:
    """Why the extension is not loaded here, or None where it is."""
    return cpu_build.missing_reason(NAME)


def linear_direct(x: torch.Tensor, qweight: torch.Tensor, weight_bits: int, scale: torch.Tensor,
                  zero: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 or W4A8 with per-token activations on a 2-D `x [M, K]`, per-channel (`scale [N, 1]`) or per-tensor
    (`[1, 1]`) weights, symmetric or not: `torch_ops.linear_int` on the codes, bit for bit, in x's dtype."""
    n = qweight.shape[0]
    ext = extension()
    via_fp32 = x.dtype not in (torch.float32, torch.bfloat16)  # the C++ passes read and write these two
    xu, x_scale, rowsum = ext.quantize_u8(x.float() if via_fp32 else x)
    if weight_bits == 8:  # raw codes; the zero points come back in the epilogue
        packed, epilogue_zero = onednn.packed_codes(qweight), zero
    else:  # `code - zero` fits int8 for W4: oneDNN's packing folds it in
        packed, epilogue_zero = onednn.packed_weight(qweight, 4, x.shape[1], zero)[0], None
    acc = onednn.gemm_u8(xu, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64))  # scales 1: exact sums
    z = None if epilogue_zero is None else epilogue_zero.reshape(-1).expand(n)
    y, rounded = ext.zero_point_epilogue(acc, rowsum, z, scale.reshape(-1).expand(n), x_scale, bias,
                                         x.dtype == torch.bfloat16)
    if bool(rounded.any()):  # a sum of 2^24 or more: oneDNN's fp32 value may have rounded
        codes = unpack_int4(qweight, x.shape[1]) if weight_bits == 4 else qweight
        y[rounded] = linear_int(x[rounded], codes, scale, zero, bias, 8).to(y.dtype)
    return y.to(x.dtype) if via_fp32 else y
