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
not, the dispatch keeps the exact fp32-BLAS GEMM.

oneDNN ignores weight zero points (silently), so asymmetric 4-bit weights are packed as `code - zero`
(which fits int8); asymmetric 8-bit weights do not fit and stay on the torch path.

The packed (oneDNN-layout, int8) weight is built on first use and cached per weight tensor (rebuilt when
the codes or zero points are modified in place): 1 byte per weight on top of the stored codes.
"""

from __future__ import annotations

import functools
import weakref

import torch

from ..quant.formats import unpack_int4

_packed: dict[int, tuple] = {}  # id(qweight) -> (weakref, version, packed weight, zero points)


@functools.cache
def available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def gemm(xq: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor) -> torch.Tensor:
    """`float(xq @ codes^T) * w_scale` in fp32, for int8 codes `xq [M, K]` (made u8 with zero point 128)."""
    xu = xq.contiguous().view(torch.uint8).bitwise_xor(128)  # two's complement -> offset binary: code + 128
    return torch.ops.onednn.qlinear_pointwise(
        xu, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0, torch.float32, "none", [], "")


@functools.cache
def exact_for(weight_bits: int) -> bool:
    """Whether oneDNN's int8 GEMM is exact on this CPU for `weight_bits`-bit weights: a worst-case probe
    (every activation code +127 and -127, every weight at the range's ends) against the int64 product."""
    if not available():
        return False
    hi = 2 ** weight_bits - 1  # the widest `code - zero` this width packs: 15 for W4, 127 (symmetric) for W8
    lo, hi = (-hi, hi) if weight_bits == 4 else (-128, 127)
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


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def packed_weight(qweight: torch.Tensor, weight_bits: int, in_features: int,
                  zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(oneDNN-packed int8 weight, its zero points: all 0) of `qweight` (int8 codes, or packed int4) and the
    per-channel `zero [N, 1]` (W4 only) or None; cached."""
    key, version = id(qweight), (_version(qweight), None if zero is None else (id(zero), _version(zero)))
    hit = _packed.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == version:
        return hit[2], hit[3]
    codes = unpack_int4(qweight, in_features) if weight_bits == 4 else qweight
    if zero is not None:
        if weight_bits != 4:
            raise ValueError("oneDNN packs asymmetric weights only at 4 bits (code - zero must fit int8)")
        codes = (codes.to(torch.int16) - zero.to(torch.int16)).to(torch.int8)
    entry = (torch.ops.onednn.qlinear_prepack(codes.contiguous(), None),
             torch.zeros(codes.shape[0], dtype=torch.int64))
    _packed[key] = (weakref.ref(qweight, lambda _, key=key: _packed.pop(key, None)), version, *entry)
    return entry


def linear_onednn(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, weight_bits: int,
                  scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """The quantized linear from int8 activation codes and scales, for per-channel or per-tensor weights
    (`scale [N, 1]` or `[1, 1]`), symmetric (`zero` None) or, at 4 bits, asymmetric (`zero [N, 1]`)."""
    packed, zeros = packed_weight(qweight, weight_bits, xq.shape[1], zero)
    y = gemm(xq, packed, scale[:, 0].expand(zeros.shape[0]).contiguous(), zeros) * x_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)
