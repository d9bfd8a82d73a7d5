"""`torch.ops.viditq.linear`: the whole quantized layer as one registered op, so `torch.compile` traces a
quantized model with `fullgraph=True` (no graph breaks): dynamo sees one op per layer, with a fake
(meta) implementation for the shapes, and never looks inside the dispatch, the kernels' caches or the
Hadamard tables.

No `from __future__ import annotations` here: `torch.library.custom_op` reads the real annotations.
"""

from typing import Optional

import torch

from . import quantized_linear


@torch.library.custom_op("viditq::linear", mutates_args=())
def linear(x: torch.Tensor, qweight: torch.Tensor, weight_bits: int, scale: torch.Tensor,
           zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], act_bits: int,
           act_scale: Optional[torch.Tensor], smooth: Optional[torch.Tensor],
           rotation_seed: Optional[int]) -> torch.Tensor:
    """`Q(x diag(smooth) R) Q(W')^T + bias` on a 2-D `x [M, K]` -> `[M, N]` in x's dtype."""
    return quantized_linear(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed)


@linear.register_fake
def _(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    return x.new_empty((x.shape[0], qweight.shape[0]))  # qweight is [N, K] (W8) or [N, ceil(K / 2)] (W4)
