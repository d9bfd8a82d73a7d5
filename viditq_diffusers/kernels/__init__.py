"""Kernel dispatch: the one place that decides which implementation runs.

For now every device runs the torch path (`torch._int_mm` on CPU and CUDA); fused
Triton kernels will plug in here.
"""

from .torch_ops import int_mm, linear_int, linear_reference, linear_weight_only


def quantized_linear(x, codes, scale, zero, bias, act_bits, act_scale=None):
    """Dispatch a quantized linear on a 2-D input `x`."""
    if act_bits >= 16:
        return linear_weight_only(x, codes, scale, zero, bias)
    return linear_int(x, codes, scale, zero, bias, act_bits, act_scale)


__all__ = ["int_mm", "linear_int", "linear_reference", "linear_weight_only", "quantized_linear"]
