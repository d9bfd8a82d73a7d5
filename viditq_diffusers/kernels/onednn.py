"""The CPU integer GEMM through oneDNN: u8 activations x s8 weights, int32 accumulation, fp32 epilogue.

Why oneDNN: it has the x86 int8 kernels (AMX, VNNI, and AVX2's `vpmaddubsw`) that `torch._int_mm` lacks on
CPU, and torch ships it (`torch.ops.onednn.qlinear_pointwise`, the op behind torch's x86 int8 inference).
Per-token activation scales do not fit its per-tensor input scale, so it runs with input scale 1 and
weight scales `[N]`, which gives `float(acc) * w_scale`; the per-token scale and the bias follow in torch,
in the same order as `torch_ops.linear_int`.

The catch: without VNNI, AVX2 adds two u8 x s8 products in *saturating* int16. Activations go in as
`code + 128` (0..255), so 8-bit weights (|w| up to 128) can overflow and give silently wrong sums, while
4-bit weights (|w| <= 15, zero point folded in) never can (2 x 255 x 15 < 2^15). :func:`exact_for` runs a
worst-case probe once per weight width and answers whether this CPU's oneDNN path is exact; where it is
not, 8-bit weights go in split (below).

oneDNN ignores weight zero points (silently), so asymmetric 4-bit weights are packed as `code - zero`
(which fits int8).

8-bit weights where the direct route is not exact (AVX2 without VNNI) or `code - zero` does not fit int8
(asymmetric) take the *split* route (`split=True`; route `onednn_split` in `kernels.routes`): `d = code - zero`
(in [-255, 255]) is written as `16 hi + lo` with `hi` in [-16, 15] and `lo` in [0, 15], both halves are stacked
along N into one GEMM of 2N outputs (pairs stay below 2 x 255 x 16 < 2^15: exact on every x86 ISA level), and
`16 acc_hi + acc_lo` is summed with one rounding, which equals the int32 accumulator's conversion to fp32. Each
half's sum must convert to fp32 exactly, so K is limited to `SPLIT_MAX_K`. It is twice the GEMM work of W4, and
still 1.2-1.5x faster than the exact fp32-BLAS route at DiT shapes on AVX2 (`benchmarks/speed_cpu.py`).

The packed (oneDNN-layout, int8) weight is built on first use and cached per weight tensor (rebuilt when
the codes or zero points are modified in place): 1 byte per weight on top of the stored codes (2 for the
split route).
"""

from __future__ import annotations

import functools

import torch

from ..quant.formats import unpack_int4
from . import weight_cache


@functools.cache
def available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def gemm(xq: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor) -> torch.Tensor:
    """`float(xq @ codes^T) * w_scale` in fp32, for int8 codes `xq [M, K]` (made u8 with zero point 128)."""
    xu = xq.contiguous().view(torch.uint8).bitwise_xor(128)  # two's complement -> offset binary: code + 128
    return gemm_u8(xu, packed, w_scale, w_zero)


def gemm_u8(xu: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor) -> torch.Tensor:
    """`gemm` for activations already in offset binary (`xu` u8 = code + 128). With `w_scale` all ones each
    output is the integer sum converted to fp32."""
    return torch.ops.onednn.qlinear_pointwise(
        xu, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], "")


def packed_codes(qweight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packing of the int8 codes `[N, K]` as they are (zero points left to the caller), cached."""
    return weight_cache.packed("onednn_codes", qweight, None,
                               lambda: torch.ops.onednn.qlinear_prepack(qweight.contiguous(), None))


SPLIT_MAX_K = 2**24 // (128 * 16)  # |acc_hi| <= 128 * 16 * K must convert to fp32 exactly


@functools.cache
def exact_for(weight_bits: int) -> bool:
    """Whether oneDNN's int8 GEMM is exact on this CPU for `weight_bits`-bit weights packed directly."""
    hi = 2 ** weight_bits - 1  # the widest `code - zero` this width packs: 15 for W4, 127 (symmetric) for W8
    return _exact_for_range(-hi, hi) if weight_bits == 4 else _exact_for_range(-128, 127)


@functools.cache
def exact_split() -> bool:
    """Whether the split route (halves in [-16, 15]) is exact on this CPU (it is on every x86 ISA level)."""
    return _exact_for_range(-16, 15)


def _exact_for_range(lo: int, hi: int) -> bool:
    """A worst-case probe (every activation code +127 and -127, every weight `lo` or `hi`) against the int64
    product."""
    if not available():
        return False
    g = torch.Generator().manual_seed(0)
    codes = torch.where(torch.rand(32, 256, generator=g) < 0.5, lo, hi).to(torch.int8)
    xq = torch.cat([torch.full((8, 256), 127), torch.full((8, 256), -127),
                    torch.randint(-127, 128, (16, 256), generator=g)]).to(torch.int8)
    try:
        out = gemm(xq, torch.ops.onednn.qlinear_prepack(codes, None), torch.ones(32),
                   torch.zeros(32, dtype=torch.int64))
    except RuntimeError:
        return False
    return torch.equal(out.double(), (xq.double() @ codes.double().T))


def packed_weight(qweight: torch.Tensor, weight_bits: int, in_features: int, zero: torch.Tensor | None = None,
                  split: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(oneDNN-packed int8 weight, its zero points: all 0) of `qweight` (int8 codes, or packed int4) and the
    per-channel `zero [N, 1]` or None; for the split route (`split`, 8-bit weights) the weight has 2N rows.
    Cached."""
    return weight_cache.packed("onednn_split" if split else "onednn", qweight, zero,
                               lambda: _pack(qweight, weight_bits, in_features, zero, split))


def _pack(qweight, weight_bits, in_features, zero, split):
    codes = unpack_int4(qweight, in_features) if weight_bits == 4 else qweight
    if split:  # 16 hi + lo, stacked along N
        d = codes.to(torch.int16) - (0 if zero is None else zero.to(torch.int16))
        hi = torch.div(d, 16, rounding_mode="floor")
        codes = torch.cat([hi, d - 16 * hi]).to(torch.int8)
    elif zero is not None:
        if weight_bits != 4:
            raise ValueError("oneDNN packs 8-bit weights with zero points only split (split=True)")
        codes = (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8)
    return (torch.ops.onednn.qlinear_prepack(codes.contiguous(), None),
            torch.zeros(codes.shape[0], dtype=torch.int64))


def linear_onednn(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, weight_bits: int,
                  scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                  out_dtype: torch.dtype, split: bool = False) -> torch.Tensor:
    """The quantized linear from int8 activation codes and scales, for per-channel or per-tensor weights
    (`scale [N, 1]` or `[1, 1]`), symmetric (`zero` None) or asymmetric (`zero [N, 1]`); `split`: 8-bit
    weights in two 4-bit halves (needed where `code - zero` does not fit int8 or the direct GEMM is not exact
    for W8 here, and exact only for K <= `SPLIT_MAX_K`: the caller, `kernels.routes`, checks)."""
    packed, zeros = packed_weight(qweight, weight_bits, xq.shape[1], zero, split)
    if split:
        halves = gemm(xq, packed, torch.ones(zeros.shape[0]), zeros)  # fp32, each an exact integer
        n = zeros.shape[0] // 2
        # 16 hi is exact, so the one rounding of the sum equals the int32 accumulator's conversion to fp32
        acc = torch.add(halves[:, n:], halves[:, :n], alpha=16)
        y = acc * scale[:, 0] * x_scale  # as torch_ops.linear_int
    else:
        y = gemm(xq, packed, scale[:, 0].expand(zeros.shape[0]).contiguous(), zeros) * x_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)
