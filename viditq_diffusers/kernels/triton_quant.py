"""Fused per-token activation quantization (Triton): optional smoothing multiply -> absmax -> int8 codes.

One program per token row reads the row once and writes its codes, its fp32 scale and the int32 sum of
its codes (what the GEMM needs to fold in the weight zero points). It is bit-exact with the torch path
(`quant.formats.quantize_activation_per_token` after `x * smooth` in x's dtype): the division is the
IEEE one (`div_rn`) and rounding is half to even (the 1.5 * 2^23 trick, exact for |v| < 2^22; codes are
at most 128 in magnitude), so tests compare codes for equality.

Runs on CPU tensors under `TRITON_INTERPRET=1` (tests); otherwise CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds an fp32 to an integer, half to even


@triton.jit
def _round_to_bf16(v):
    """fp32 -> nearest bf16 (ties to even), kept in fp32. Written out because Triton's CPU interpreter
    truncates fp32 -> bf16 casts; the GPU gets the same (exact) arithmetic."""
    bits = v.to(tl.int32, bitcast=True)  # int32 wraps like uint32 here; & -65536 keeps the top 16 bits
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows(x_ptr, smooth_ptr, codes_ptr, scale_ptr, rowsum_ptr, K, stride_x, stride_c,
                   QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if HAS_SMOOTH:
        # as torch does `x * smooth.to(x.dtype)`: both the factor and the product are rounded to x's dtype
        m = tl.load(smooth_ptr + cols, mask=mask, other=0.0)
        if x.dtype == tl.bfloat16:
            xf = _round_to_bf16(xf * _round_to_bf16(m))
        else:
            xf = (x * m.to(x.dtype)).to(tl.float32)
    scale = tl.div_rn(tl.max(tl.abs(xf), axis=0), QMAX * 1.0)
    safe = tl.where(scale > 0, scale, 1.0)
    v = tl.div_rn(xf, safe)
    v = (v + _RNE) - _RNE
    q = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
    tl.store(codes_ptr + row.to(tl.int64) * stride_c + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(rowsum_ptr + row, tl.sum(q, axis=0))


def quantize_per_token(x: torch.Tensor, bits: int = 8, smooth: torch.Tensor | None = None):
    """`x [M, K]` (fp32/bf16/fp16) -> `(codes int8 [M, K], scale fp32 [M, 1], rowsum int32 [M])`.

    `smooth` `[K]` fp32 (optional) multiplies the channels first, as channel balancing's smoothing does.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token expects a 2-D [tokens, channels] input, got {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    rowsum = torch.empty(m, dtype=torch.int32, device=x.device)
    if m == 0:
        return codes, scale, rowsum
    block = triton.next_power_of_2(k)
    _quantize_rows[(m,)](
        x, smooth if smooth is not None else x, codes, scale, rowsum, k, x.stride(0), codes.stride(0),
        QMAX=2 ** (bits - 1) - 1, HAS_SMOOTH=smooth is not None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return codes, scale, rowsum
