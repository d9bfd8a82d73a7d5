"""The torch implementation of the quantized linear, and its float reference.

`linear_int` is what runs: activations are quantized per token and multiplied with the
int codes by a real integer GEMM (`int_mm`: exact on fp32 BLAS on CPU, `torch._int_mm` on
CUDA; int32 accumulation); scales, zero points and bias are applied to the int32 result. `linear_reference` is
the same math in float64 with dequantized operands; tests hold the two against each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.formats import dequantize_weight, quantize_activation_per_token, quantize_activation_static


EXACT_FP32 = 2**24  # every integer of magnitude <= 2^24 is an fp32 number


def int_mm_exact_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 `a [M, K]` x int8 `b [N, K]`^T -> int32 `[M, N]`, exactly, on the fp32 GEMM.

    With integer operands, every product and partial sum of a K-chunk is an integer of magnitude at most
    `chunk * max|a| * max|b|`; while that stays <= 2^24 each one is an fp32 number, so the fp32 GEMM makes
    no rounding at all, in any summation order. Chunks are summed in int32. On CPUs without int8 dot
    instructions (AVX2 without VNNI) this is ~17x faster than `torch._int_mm` (benchmarks/speed_cpu.py), and gives
    the same int32 result bit for bit.
    """
    af, bf = a.float(), b.float()  # abs in fp32: int8 abs(-128) would wrap
    bound = int(af.abs().amax()) * int(bf.abs().amax()) if a.numel() and b.numel() else 0
    k = a.shape[1]
    chunk = k if bound == 0 else max(1, min(k, EXACT_FP32 // bound))
    acc = None
    for start in range(0, k, chunk):
        part = (af[:, start:start + chunk] @ bf[:, start:start + chunk].t()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc if acc is not None else torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 `a [M, K]` x int8 `b [N, K]`^T -> int32 `[M, N]`.

    CPU: the exact fp32 route (`int_mm_exact_fp32`). CUDA's `_int_mm` needs M > 16 and K, N multiples of
    8: pad with zeros (exact) and slice.
    """
    if a.device.type == "cpu":
        return int_mm_exact_fp32(a, b)
    if a.device.type == "cuda":
        m, k = a.shape
        n = b.shape[0]
        pad_m, pad_k, pad_n = max(17 - m, 0), (-k) % 8, (-n) % 8
        if pad_m or pad_k:
            a = F.pad(a, (0, pad_k, 0, pad_m))
        if pad_k or pad_n:
            b = F.pad(b, (0, pad_k, 0, pad_n))
        return torch._int_mm(a, b.t())[:m, :n]
    return torch._int_mm(a.contiguous(), b.t())


def quantize_activations(x, act_bits, act_scale=None):
    if act_scale is None:
        return quantize_activation_per_token(x, act_bits)
    return quantize_activation_static(x, act_scale, act_bits)


def int_mm_zero_point(xq: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """`xq @ (codes - zero)^T` in int32; the zero point is folded in with the row sums of `xq`."""
    acc = int_mm(xq, codes)
    if zero is not None:
        acc = acc - xq.sum(dim=1, dtype=torch.int32).unsqueeze(1) * zero.to(torch.int32).unsqueeze(0)
    return acc


def grouped_exact_fp32(xq: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
                       ) -> torch.Tensor:
    """`sum_g scale[:, g] * (xq_g @ (codes_g - zero_g)^T)` in fp32, with the same bits as the int32 route.

    The operands are converted to fp32 once (zero points folded into the weight); each group's GEMM sums
    at most `size * 128 * 255 <= 2^24` in magnitude (the caller checks), so it is exact, like
    `int_mm_exact_fp32`, and equals the int32 accumulator converted to fp32."""
    groups = scale.shape[1]
    size = codes.shape[1] // groups
    w = codes.float()
    if zero is not None:
        w = w - zero.float().repeat_interleave(size, dim=1)
    x = xq.float()
    y = None
    for g in range(groups):
        cols = slice(g * size, (g + 1) * size)
        part = (x[:, cols] @ w[:, cols].t()) * scale[:, g]
        y = part if y is None else y + part
    return y


def linear_int(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_bits: int,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """W{4,8}A8 linear on a 2-D input: activation quantization + integer GEMM.

    `codes` int8 `[N, K]`, `scale` fp32 `[N, G]` (or `[1, 1]` per-tensor), `zero` int8 like `scale`
    or None. Activations are quantized per token on the fly, or with the calibrated static
    `act_scale` when one is given (the naive baseline).
    """
    xq, x_scale = quantize_activations(x, act_bits, act_scale)
    groups = scale.shape[1]
    if groups == 1:
        y = int_mm_zero_point(xq, codes, None if zero is None else zero[:, 0]).to(torch.float32) * scale[:, 0]
    elif xq.device.type == "cpu" and codes.shape[1] // groups * 128 * 255 <= EXACT_FP32:
        y = grouped_exact_fp32(xq, codes, scale, zero)
    else:
        # One integer GEMM per input-channel group; group scales are applied in fp32.
        size = codes.shape[1] // groups
        y = None
        for g in range(groups):
            cols = slice(g * size, (g + 1) * size)
            acc = int_mm_zero_point(xq[:, cols], codes[:, cols], None if zero is None else zero[:, g])
            part = acc.to(torch.float32) * scale[:, g]
            y = part if y is None else y + part
    y = y * x_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def linear_weight_only(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """W{4,8}A16: dequantize the weight to the activation dtype and run a float matmul."""
    weight = dequantize_weight(codes, scale, zero).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_bits: int,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 reference of the quantized linear ("fake quantization"), for tests."""
    w64 = dequantize_weight(codes, scale, zero).to(torch.float64)
    if act_bits < 16:
        xq, x_scale = quantize_activations(x, act_bits, act_scale)
        # the token scale after the sum, as linear_int applies it: an Inf scale then gives +-Inf with the sign of
        # the sum (not NaN from the codes that are 0), the outputs the kernels give
        y = (xq.to(torch.float64) @ w64.t()) * x_scale.to(torch.float64)
    else:
        y = x.to(torch.float64) @ w64.t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
