"""Integer formats: pure tensor functions, no modules.

Conventions (docs/method.md, section 2):
- weights: static min-max, one scale per output channel (or per group of `group_size`
  input channels); asymmetric by default. Codes are signed (`[-2^(b-1), 2^(b-1)-1]`)
  with an integer zero point in the same range, so `W ~= scale * (code - zero)` and
  the integer matmul can take int8 operands directly;
- activations: dynamic, symmetric, one scale per token (row), round half to even;
- int4 codes are packed two per byte along the input dimension (low nibble first).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a `bits`-bit code."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def ieee_div(t: torch.Tensor, divisor: int) -> torch.Tensor:
    """`t / divisor`, correctly rounded on every device. CUDA torch turns division by a Python number into a
    multiplication by its rounded reciprocal, which can differ in the last bit; dividing by a tensor keeps
    CPU, CUDA and the Triton kernels (`div_rn`) bit-identical."""
    return t / torch.full_like(t, divisor)


def check_bits(bits: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{what}={bits} is not supported: ViDiT-Q quantizes to 4 or 8 bits "
            f"(use 16 for activations to keep them in floating point)."
        )


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
    per_tensor: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Min-max round-to-nearest weight quantization, computed once in fp32.

    `weight` is `[out, in]`. Returns `(codes int8 [out, in], scale fp32 [out, G],
    zero int8 [out, G] or None)` with `G = in // group_size` (1 when per-channel).
    `per_tensor=True` (the naive baseline) uses one scale for the whole matrix: shape `[1, 1]`,
    which broadcasts wherever a `[out, 1]` scale would.
    """
    out_features, in_features = weight.shape
    group = group_size or in_features
    if in_features % group:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            f"pick a divisor of {in_features} or group_size=None (per-channel)."
        )
    w = weight.detach().to(torch.float32).reshape(out_features, in_features // group, group)
    stats = w.reshape(1, 1, -1) if per_tensor else w
    qmin, qmax = qrange(bits)
    if symmetric:
        scale = ieee_div(stats.abs().amax(dim=-1), qmax)
        zero = None
    else:
        # The range always includes 0 (as in the reference), so 0 is exactly representable.
        wmax, wmin = stats.amax(dim=-1).clamp(min=0), stats.amin(dim=-1).clamp(max=0)
        scale = ieee_div(wmax - wmin, qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale works
    if not symmetric:
        zero = (qmin - torch.round(wmin / scale)).clamp(qmin, qmax)
    offset = zero.unsqueeze(-1) if zero is not None else 0
    codes = (torch.round(w / scale.unsqueeze(-1)) + offset).clamp(qmin, qmax)
    codes = codes.reshape(out_features, in_features).to(torch.int8)
    return codes, scale.contiguous(), None if zero is None else zero.to(torch.int8).contiguous()


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Float32 `[out, in]` weight from codes `[out, in]`, scale/zero `[out, G]`."""
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    c = codes.to(torch.float32).reshape(out_features, groups, in_features // groups)
    if zero is not None:
        c = c - zero.to(torch.float32).unsqueeze(-1)
    return (c * scale.unsqueeze(-1)).reshape(out_features, in_features)


def quantize_activation_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-row quantization of a 2-D `[tokens, channels]` tensor.

    Returns `(codes int8, scale fp32 [tokens, 1])`. A zero row gets scale 0 and codes 0
    (no NaN); `torch.round` rounds half to even. Non-finite rows (`round_to_codes`): a row holding a NaN gets
    scale NaN, one holding an Inf (and no NaN) scale Inf, so the linear's output row is NaN or +-Inf.
    """
    _, qmax = qrange(bits)
    xf = x.to(torch.float32)
    return round_to_codes(xf, ieee_div(row_absmax(xf), qmax), bits)


def row_absmax(xf: torch.Tensor) -> torch.Tensor:
    """`max |x|` of each row `[rows, 1]`; NaN where the row holds a NaN (amax propagates it), else Inf where it
    holds an Inf."""
    return torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg())  # no |x| copy


FLOAT32_MAX = torch.finfo(torch.float32).max


def round_to_codes(xf: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes of fp32 `xf` for a broadcastable fp32 `scale` (a zero scale gives zero codes).

    The divisor is the scale, except: a zero or NaN scale divides by 1 (the NaN scale makes the output NaN
    anyway, whatever the codes), and an Inf scale by the largest float32, so that +-Inf saturate to the code
    limits (127 / -128) and the output row has the sign of FP's `Inf * w` instead of coming from `Inf / Inf`.
    Every kernel takes the same divisor (`cpu_quantize.h`, `triton_quant.py`)."""
    _, qmax = qrange(bits)
    safe = torch.where(scale > 0, scale.clamp(max=FLOAT32_MAX), torch.ones_like(scale))
    codes = xf / safe
    return codes.round_().clamp_(-qmax - 1, qmax).to(torch.int8), scale  # in place: one temporary, not three


def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor,
                               bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of a 2-D tensor with one calibrated scale (finite values beyond it clip).

    Returns `(codes int8, scale fp32 [tokens, 1])`, the shapes `quantize_activation_per_token` gives. A row
    holding a NaN or an Inf does not clip: it takes its per-token scale (NaN or Inf), so its output row is NaN
    or +-Inf as with per-token scales, never a finite row that hides it.
    """
    _, qmax = qrange(bits)
    xf = x.to(torch.float32)
    absmax = row_absmax(xf)
    rows = torch.where(torch.isfinite(absmax), scale.to(torch.float32).reshape(1, 1), ieee_div(absmax, qmax))
    return round_to_codes(xf, rows, bits)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes `[out, in]` into uint8 `[out, ceil(in / 2)]`, low nibble first."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)  # code 0 in the padding column
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes `[out, in_features]`."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
