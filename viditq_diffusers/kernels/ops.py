"""`torch.ops.viditq.linear`: the whole quantized layer as one registered op, so `torch.compile` traces a
quantized model with `fullgraph=True` (no graph breaks): dynamo sees one op per layer, with a fake
(meta) implementation for the shapes, and never looks inside the dispatch, the kernels' caches or the
Hadamard tables.

No `from __future__ import annotations` here: `torch.library.custom_op` reads the real annotations.
"""

from typing import Optional

import torch

from ..quant import straight_through
from ..quant.formats import unpack_int4
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


# --- autograd: the straight-through gradient w.r.t. x ---------------------------------------------------------------
# `quant/straight_through.py` has the math: dL/dx = ((dL/dy) Wq) R^T diag(smooth), the gradient of the float layer
# the codes stand for (activation rounding counts as the identity). The bias gets its ordinary gradient when it asks
# for one (LoRA training leaves it frozen). The codes, scales and zero points (integer parameters, or fp32 views of
# them), the smoothing factors and a static activation scale are frozen: they get no gradient, and a backward that
# asks for one raises `FROZEN`. The gradient is one more registered op with a fake, so AOT autograd and inductor
# trace the backward as one node, as they do the forward.

FROZEN = ("ViDiTQLinear's quantized weight is frozen: torch.ops.viditq.linear gives gradients for its input x and "
          "its bias only, not for the weight scales, the smoothing factors or a static activation scale ({names} "
          "require grad here). Train a LoRA on the layer (viditq_diffusers.lora) instead, or keep the layer in "
          "floating point (modules_to_not_convert) to train its weight.")


@torch.library.custom_op("viditq::linear_input_grad", mutates_args=())
def linear_input_grad(grad: torch.Tensor, qweight: torch.Tensor, weight_bits: int, scale: torch.Tensor,
                      zero: Optional[torch.Tensor], smooth: Optional[torch.Tensor], rotation_seed: Optional[int],
                      in_features: int) -> torch.Tensor:
    """dL/dx `[M, in_features]` of `viditq::linear` from dL/dy `[M, N]`, in grad's dtype (straight-through)."""
    codes = unpack_int4(qweight, in_features) if weight_bits == 4 else qweight
    return straight_through.linear_input_grad(grad, codes, scale, zero, smooth, rotation_seed)


@linear_input_grad.register_fake
def _(grad, qweight, weight_bits, scale, zero, smooth, rotation_seed, in_features):
    return grad.new_empty((grad.shape[0], in_features))


@torch.library.custom_op("viditq::frozen_grad", mutates_args=())
def frozen_grad(grad: torch.Tensor, like: torch.Tensor, names: str) -> torch.Tensor:
    """The gradient for a frozen input of `viditq::linear`: there is none, so this raises (only when it runs:
    a compiled graph that traces it still runs forward)."""
    raise RuntimeError(FROZEN.format(names=names))


@frozen_grad.register_fake
def _(grad, like, names):
    return torch.empty_like(like)


_X, _SCALE, _BIAS, _ACT_SCALE, _SMOOTH = 0, 3, 5, 7, 8
_FROZEN_NAMES = {_SCALE: "scale", _ACT_SCALE: "act_scale", _SMOOTH: "smooth"}


def _setup_context(ctx, inputs, output):
    x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed = inputs
    ctx.weight_bits, ctx.rotation_seed, ctx.in_features = weight_bits, rotation_seed, x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype
    # the layer's own tensors (no copies); x itself is not needed, so training keeps no extra activation
    ctx.save_for_backward(qweight, scale, zero, smooth, act_scale)


def _backward(ctx, grad):
    qweight, scale, zero, smooth, act_scale = ctx.saved_tensors
    grads = [None] * 10
    if ctx.needs_input_grad[_X]:
        grads[_X] = linear_input_grad(grad, qweight, ctx.weight_bits, scale, zero, smooth, ctx.rotation_seed,
                                      ctx.in_features)
    if ctx.needs_input_grad[_BIAS]:
        grads[_BIAS] = grad.sum(0).to(ctx.bias_dtype)
    frozen = [i for i in _FROZEN_NAMES if ctx.needs_input_grad[i]]
    names = ", ".join(_FROZEN_NAMES[i] for i in frozen)
    tensors = {_SCALE: scale, _ACT_SCALE: act_scale, _SMOOTH: smooth}
    for i in frozen:
        grads[i] = frozen_grad(grad, tensors[i], names)
    return tuple(grads)


linear.register_autograd(_backward, setup_context=_setup_context)
