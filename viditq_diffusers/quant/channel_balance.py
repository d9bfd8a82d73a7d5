"""Static-dynamic channel balancing: pure float functions (docs/method.md; `recipe.py` decides each layer's recipe).

For a linear layer `y = x W^T + b` with `W` of shape `[out, in]`:
- smoothing ("static" part): a per-input-channel scale `m` moves magnitude
  between activation and weight, `x -> x diag(m)`, `W -> W diag(1/m)`;
- rotation ("dynamic" part): an orthogonal `R` (seeded signs times a Hadamard
  matrix, see `hadamard.py`) mixes channels, `x -> x R`, `W -> W R`.
Together `x' = (x diag(m)) R` and `W' = (W diag(1/m)) R` give
`x' W'^T = x diag(m) R R^T diag(1/m) W^T = x W^T`, so the layer is unchanged
before quantization. Quantizing `W'` (once, offline) and `x'` (per token,
online) is done elsewhere.
"""

from __future__ import annotations

import torch

from .hadamard import rotate, rotate_kernel_order, rotation_matrix


def _check_stat(name: str, stat: torch.Tensor) -> None:
    if torch.isnan(stat).any():
        raise ValueError(f"{name} contains NaN; calibration statistics must be finite")
    if (stat < 0).any():
        raise ValueError(f"{name} contains negative values; it must be an absolute maximum")


def smoothing_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-3
) -> torch.Tensor:
    """Per-input-channel smoothing scale `m_j = w_j^alpha / a_j^(1 - alpha)`.

    `act_absmax` `[in]`: max |x_j| over calibration data; `weight` `[out, in]`;
    `w_j = max_i |W_ij|`. Both are clamped at `eps` so an all-zero channel gives
    a finite `m`. Activations are multiplied by `m` and weights divided by it,
    so the balanced channel maxima are `a_j m_j = (a_j w_j)^alpha` and
    `w_j / m_j = (a_j w_j)^(1 - alpha)`.

    Conventions: this `alpha` (ViDiT-Q's) is the weight exponent; it equals
    `1 - alpha` of SmoothQuant, which writes `s_j = a_j^alpha / w_j^(1 - alpha)`
    and uses `x / s`, `W * s` (so `m = 1 / s`). alpha=0: `m = 1 / a` (all
    activation channels scaled to 1); alpha=1: `m = w` (all weight channels to 1).

    Computed in float64; returned in `act_absmax`'s dtype.
    """
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha={alpha} must be in [0, 1] (ViDiT-Q convention: 1 - SmoothQuant's alpha)")
    if act_absmax.dim() != 1 or weight.dim() != 2 or weight.shape[1] != act_absmax.shape[0]:
        raise ValueError(
            f"act_absmax {tuple(act_absmax.shape)} must be [in] for weight {tuple(weight.shape)} [out, in]"
        )
    _check_stat("act_absmax", act_absmax)
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or inf")
    a = act_absmax.to(torch.float64).clamp_min(eps)
    w = weight.to(torch.float64).abs().amax(dim=0).clamp_min(eps)
    m = w.pow(alpha) / a.pow(1.0 - alpha)
    if not torch.isfinite(m).all():
        raise ValueError("act_absmax contains inf; smoothing factors would not be finite")
    return m.to(act_absmax.dtype if act_absmax.is_floating_point() else torch.float32)


def check_smoothing(smoothing: torch.Tensor, n: int) -> None:
    """Raise a ValueError unless `smoothing` holds one factor per input channel (`[n]`)."""
    if smoothing.shape != (n,):
        raise ValueError(f"smoothing has shape {tuple(smoothing.shape)}, expected [{n}] (one per input channel)")


def balance_weight(
    weight: torch.Tensor, smoothing: torch.Tensor | None, rotation_seed: int | None
) -> torch.Tensor:
    """`W' = (W diag(1/smoothing)) R` for an nn.Linear weight `[out, in]`.

    Rows of `W` are row vectors over input channels, so `W R` is `rotate(W)`.
    Computed in float64 (the weight is quantized once from this) and cast back
    to the weight's dtype. Either argument may be None to skip that step.
    """
    w = weight.to(torch.float64)
    if smoothing is not None:
        check_smoothing(smoothing, weight.shape[-1])
        if not (torch.isfinite(smoothing).all() and (smoothing > 0).all()):
            raise ValueError("smoothing must be finite and positive")
        w = w / smoothing.to(device=w.device, dtype=torch.float64)
    if rotation_seed is not None:
        w = rotate(w, rotation_seed)
    return w.to(weight.dtype)


def balance_activation(
    x: torch.Tensor, smoothing: torch.Tensor | None, rotation_seed: int | None
) -> torch.Tensor:
    """`x' = (x diag(smoothing)) R` over the last dimension, in x's dtype and device.

    Uses the fast Walsh-Hadamard path of `rotate`. Either argument may be None.
    """
    return _smoothed_and_rotated(x, smoothing, rotation_seed, rotate)


def balance_activation_kernel_order(
    x: torch.Tensor, smoothing: torch.Tensor | None, rotation_seed: int | None
) -> torch.Tensor:
    """:func:`balance_activation` with the rotation in the kernels' order (`hadamard.rotate_kernel_order`): what
    every quantized linear route computes before quantizing (the torch route with these torch ops, the C++ and
    Triton ones in their own passes, bit for bit). Equal to :func:`balance_activation` for power-of-two widths;
    otherwise different from it by float rounding only.
    """
    return _smoothed_and_rotated(x, smoothing, rotation_seed, rotate_kernel_order)


def _smoothed_and_rotated(x, smoothing, rotation_seed, rotation) -> torch.Tensor:
    if smoothing is not None:
        check_smoothing(smoothing, x.shape[-1])
        x = x * smoothing.to(device=x.device, dtype=x.dtype)
    if rotation_seed is not None:
        x = rotation(x, rotation_seed)
    return x


def unbalance_weight(
    weight: torch.Tensor, smoothing: torch.Tensor | None, rotation_seed: int | None
) -> torch.Tensor:
    """The inverse of :func:`balance_weight`: `W = (W' R^T) diag(smoothing)` (float64, cast back).

    Offline only (dequantizing a checkpoint back to nn.Linear): it uses the dense `R`."""
    w = weight.to(torch.float64)
    if rotation_seed is not None:
        w = w @ rotation_matrix(w.shape[-1], rotation_seed, torch.float64).to(w.device).T
    if smoothing is not None:
        check_smoothing(smoothing, weight.shape[-1])
        w = w * smoothing.to(device=w.device, dtype=torch.float64)
    return w.to(weight.dtype)
