"""The gradient of a quantized linear with respect to its input: the straight-through estimator (STE).

The layer computes `y = Q(x') Wq^T + b` with `x' = x diag(m) R` (smoothing `m`, rotation `R`; either may be
absent) and `Wq` the dequantized codes in that balanced basis. Rounding has a zero derivative almost
everywhere, so training through it uses the STE: the activation quantizer `Q` counts as the identity (per-token
scales are the row's absolute maximum, so nothing is clipped; with a static scale, clipped values pass the
gradient too), and the gradient is that of the float layer the codes stand for:

    dL/dx = ((dL/dy) Wq) R^T diag(m)

The weight is frozen: its codes, scales and zero points, the smoothing factors and a static activation scale get
no gradient. Pure tensor functions; `kernels/ops.py` registers this as the backward of `torch.ops.viditq.linear`.
"""

from __future__ import annotations

import torch

from .formats import dequantize_weight
from .hadamard import rotate_transpose


def linear_input_grad(grad: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      smooth: torch.Tensor | None, rotation_seed: int | None) -> torch.Tensor:
    """`dL/dx [M, K]` in grad's dtype from `grad = dL/dy [M, N]`, int8 `codes [N, K]` (W4 unpacked), fp32
    `scale [N, G]` (or `[1, 1]`), int8 `zero` like `scale` or None, `smooth [K]` or None, `rotation_seed` or None.

    Computed in grad's dtype, as `nn.Linear`'s backward is: the weight is dequantized in fp32 and cast once."""
    weight = dequantize_weight(codes, scale, zero).to(device=grad.device, dtype=grad.dtype)
    g = grad @ weight  # dL/dx'
    if rotation_seed is not None:
        g = rotate_transpose(g, rotation_seed)  # x' = s R  ->  dL/ds = dL/dx' R^T
    if smooth is not None:
        g = g * smooth.to(device=g.device, dtype=g.dtype)  # s = x diag(m)  ->  dL/dx = dL/ds diag(m)
    return g
