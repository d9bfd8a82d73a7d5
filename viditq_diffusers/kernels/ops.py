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


# --- autograd: none yet, said clearly ------------------------------------------------------------------------------
# The layer is frozen (integer codes; its bias does not require grad), but its input may require grad outside
# `torch.no_grad()`, e.g. after a float layer. Without a formula, autograd and torch.compile's AOT tracing fail with
# torch's "no autograd formula" error even for inference. The formula below traces (`no_backward`'s fake returns
# the gradient's shape) and raises only when a backward actually runs.

NO_BACKWARD = ("ViDiTQLinear has no backward pass yet (its weights are integer codes and torch.ops.viditq.linear "
               "has no gradient formula): run inference under torch.no_grad() or torch.inference_mode(), or keep "
               "the layers you train in floating point (modules_to_not_convert).")


@torch.library.custom_op("viditq::no_backward", mutates_args=())
def no_backward(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The gradient for `like` through `viditq::linear`: there is none yet, so this raises."""
    raise RuntimeError(NO_BACKWARD)


@no_backward.register_fake
def _(grad, like):
    return torch.empty_like(like)


_DIFFERENTIABLE = (0, 3, 5, 7, 8)  # x, scale, bias, act_scale, smooth: the floating-point tensor inputs


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(inputs[i] for i in _DIFFERENTIABLE))


def _backward(ctx, grad):
    grads = [None] * 10
    for i, like in zip(_DIFFERENTIABLE, ctx.saved_tensors):
        if ctx.needs_input_grad[i]:
            grads[i] = no_backward(grad, like)
    return tuple(grads)


linear.register_autograd(_backward, setup_context=_setup_context)
