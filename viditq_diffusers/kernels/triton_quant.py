"""Fused per-token activation quantization (Triton): optional smoothing multiply -> optional block Hadamard
rotation -> absmax -> int8 codes.

One program per token row reads the row once and writes its codes, its fp32 scale and the int32 sum of
its codes (what the GEMM needs to fold in the weight zero points). It is bit-exact with its torch reference
(`quant.formats.quantize_activation_per_token` after `x * smooth` in x's dtype, then
`quant.hadamard.rotate_kernel_order`): the division is the IEEE one (`div_rn`) and rounding is half to even
(the 1.5 * 2^23 trick, exact for |v| < 2^22; codes are at most 128 in magnitude), so tests compare codes
for equality.

The rotation (`n = p * 2^k` channels, the row held as a `[p, 2^k]` tile) runs the dense factor `H_p` as an
unrolled sum over its rows, then the FWHT as butterflies (reshape, split, join) in the torch path's order,
rounding to x's dtype where torch does. Butterflies rather than a `tl.dot` with a constant `H`: a dot sums in
an unspecified order, which would make the codes differ from any torch reference at rounding ties.

Runs on CPU tensors under `TRITON_INTERPRET=1` (tests); otherwise CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.channel_balance import balance_activation_kernel_order
from ..quant.hadamard import rotation_factors

MAX_ROTATED_TILE = 16384  # the rotated row is held as one [p (to a power of two), 2^k] register tile
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds an fp32 to an integer, half to even


@triton.jit
def _round_to_bf16(v):
    """fp32 -> nearest bf16 (ties to even), kept in fp32. Written out because Triton's CPU interpreter
    truncates fp32 -> bf16 casts; the GPU gets the same (exact) arithmetic."""
    bits = v.to(tl.int32, bitcast=True)  # int32 wraps like uint32 here; & -65536 keeps the top 16 bits
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _smoothed(x, m):
    """`x * m` in fp32 as torch computes `x * smooth.to(x.dtype)`: factor and product rounded to x's dtype."""
    if x.dtype == tl.bfloat16:
        return _round_to_bf16(x.to(tl.float32) * _round_to_bf16(m))
    else:
        return (x * m.to(x.dtype)).to(tl.float32)


@triton.jit
def _magnitude_bits(v):
    """|v| as int32 bit patterns. Their max is the float max |v|, but NaN where one is NaN, as torch's amax (a
    float max may drop it): non-negative floats order as their bits, and every NaN lies above Inf."""
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _codes(v, scale, QMAX: tl.constexpr):
    """int32 codes `clamp(round_half_even(v / divisor), -QMAX - 1, QMAX)` with `quant.formats.round_to_codes`'s
    divisor: a zero or NaN scale divides by 1, an Inf one by the largest float32 (+-Inf saturate). NaN values
    give code 0 (their row's NaN scale makes the output NaN)."""
    v = tl.div_rn(v, tl.where(scale > 0, tl.minimum(scale, _FLOAT32_MAX), 1.0))
    v = (v + _RNE) - _RNE
    v = tl.where(v == v, v, 0.0)
    return tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)


@triton.jit
def _quantize_rows(x_ptr, smooth_ptr, codes_ptr, scale_ptr, rowsum_ptr, K, stride_x, stride_c,
                   QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if HAS_SMOOTH:
        xf = _smoothed(x, tl.load(smooth_ptr + cols, mask=mask, other=0.0))
    absmax = tl.max(_magnitude_bits(xf), axis=0).to(tl.float32, bitcast=True)
    scale = tl.div_rn(absmax, QMAX * 1.0)
    q = _codes(xf, scale, QMAX)
    tl.store(codes_ptr + row.to(tl.int64) * stride_c + cols, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(rowsum_ptr + row, tl.sum(q, axis=0))


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 -> nearest value of `dtype` (kept in fp32): where torch rounds a half-precision result."""
    if dtype == tl.bfloat16:
        return _round_to_bf16(v)
    elif dtype == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _smoothed_scaled(x_ptr, smooth_ptr, sign_ptr, offs, HAS_SMOOTH: tl.constexpr):
    """`(x * smooth) * (signs / sqrt(n))` at `offs`, each product rounded to x's dtype as torch rounds it."""
    x = tl.load(x_ptr + offs)
    v = _smoothed(x, tl.load(smooth_ptr + offs)) if HAS_SMOOTH else x.to(tl.float32)
    return _round_to(v * tl.load(sign_ptr + offs).to(tl.float32), x.dtype)


@triton.jit
def _butterfly(y, dtype: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr, H: tl.constexpr):
    """One FWHT stage over the last axis of `y [ROWS, WIDTH]`: pairs (i, i + H) -> (a + b, a - b)."""
    y = tl.permute(tl.reshape(y, [ROWS, WIDTH // (2 * H), 2, H]), [0, 1, 3, 2])
    a, b = tl.split(y)
    y = tl.join(_round_to(a + b, dtype), _round_to(a - b, dtype))
    return tl.reshape(tl.permute(y, [0, 1, 3, 2]), [ROWS, WIDTH])


@triton.jit
def _quantize_rotated_rows(x_ptr, smooth_ptr, sign_ptr, dense_ptr, codes_ptr, scale_ptr, rowsum_ptr,
                           stride_x, stride_c, QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                           P: tl.constexpr, P_BLOCK: tl.constexpr, POW2: tl.constexpr, LOG2: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    a = tl.arange(0, P_BLOCK)
    j = tl.arange(0, POW2)
    if P == 1:
        y = tl.reshape(_smoothed_scaled(x_row, smooth_ptr, sign_ptr, j, HAS_SMOOTH), [1, POW2])
    else:
        # out[a, :] = sum_c H_p[c, a] y[c, :], c ascending; products by +-1 are exact, each add rounds in fp32
        acc = tl.zeros([P_BLOCK, POW2], dtype=tl.float32)
        for c in range(P):  # a loop, not unrolled: compile time stays flat in p (108 for 13824 channels)
            y_c = _smoothed_scaled(x_row, smooth_ptr, sign_ptr, c * POW2 + j, HAS_SMOOTH)
            h_c = tl.load(dense_ptr + c * P + a, mask=a < P, other=0.0)
            acc += h_c[:, None] * y_c[None, :]
        # the padding rows (a >= P) hold 0 * x, NaN where x is Inf: zero them, or the row's absmax would be NaN
        y = tl.where((a < P)[:, None], _round_to(acc, dtype), 0.0)
    for s in tl.static_range(LOG2):
        y = _butterfly(y, dtype, P_BLOCK, POW2, 1 << s)
    absmax = tl.max(tl.max(_magnitude_bits(y), axis=1), axis=0).to(tl.float32, bitcast=True)
    scale = tl.div_rn(absmax, QMAX * 1.0)
    q = _codes(y, scale, QMAX)
    offs = a[:, None] * POW2 + j[None, :]
    tl.store(codes_ptr + row.to(tl.int64) * stride_c + offs, q.to(tl.int8), mask=offs < P * POW2)
    tl.store(scale_ptr + row, scale)
    tl.store(rowsum_ptr + row, tl.sum(tl.sum(q, axis=1), axis=0))


def quantize_per_token(x: torch.Tensor, bits: int = 8, smooth: torch.Tensor | None = None,
                       rotation_seed: int | None = None):
    """`x [M, K]` (fp32/bf16/fp16) -> `(codes int8 [M, K], scale fp32 [M, 1], rowsum int32 [M])`.

    `smooth` `[K]` fp32 (optional) multiplies the channels first, as channel balancing's smoothing does;
    `rotation_seed` (optional) then rotates them (`quant.hadamard.rotate_kernel_order`). A rotation whose
    `[p, 2^k]` tile exceeds MAX_ROTATED_TILE elements runs in torch first, in the same order
    (`quant.channel_balance.balance_activation_kernel_order`).
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
    qmax = 2 ** (bits - 1) - 1
    if rotation_seed is not None:
        pow2, signs, dense = rotation_factors(k, rotation_seed, x.dtype, x.device)
        p = k // pow2
        tile = triton.next_power_of_2(p) * pow2
        if tile <= MAX_ROTATED_TILE:
            _quantize_rotated_rows[(m,)](
                x, smooth if smooth is not None else x, signs, dense.float() if dense is not None else signs,
                codes, scale, rowsum, x.stride(0), codes.stride(0), QMAX=qmax, HAS_SMOOTH=smooth is not None,
                P=p, P_BLOCK=triton.next_power_of_2(p), POW2=pow2, LOG2=pow2.bit_length() - 1,
                num_warps=min(max(tile // 256, 1), 16),
            )
            return codes, scale, rowsum
        x, smooth = balance_activation_kernel_order(x, smooth, rotation_seed), None
    block = triton.next_power_of_2(k)
    _quantize_rows[(m,)](
        x, smooth if smooth is not None else x, codes, scale, rowsum, k, x.stride(0), codes.stride(0),
        QMAX=qmax, HAS_SMOOTH=smooth is not None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return codes, scale, rowsum
