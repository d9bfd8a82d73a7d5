"""Kernel dispatch: the one place that decides which implementation runs.

- CUDA tensors, A8 with dynamic per-token scales, more than 16 tokens, group sizes that are multiples of
  64: the fused Triton path (`triton_quant`, smoothing and rotation included, + `triton_gemm`);
- CPU tensors, A8 with dynamic per-token scales, per-channel weights, on Intel CPUs with AMX: our AMX int8
  GEMM with its epilogue fused (`cpu_amx`), where it builds;
- the same elsewhere, where oneDNN's direct int8 GEMM is exact (W4 everywhere, W8 on x86 with VNNI): that
  GEMM between our C++ quantization and zero-point epilogue (`cpu_direct`), where it builds;
- CPU tensors, A8 with dynamic per-token scales, W8, where oneDNN's direct int8 GEMM is not exact (x86
  without VNNI or AMX): our int16 kernel (`cpu_int16`), where it builds;
- CPU tensors, A8, per-channel weights, where those C++ kernels do not build (or static activation
  scales): oneDNN's int8 GEMM (`onednn`) with torch ops around it, directly where it is exact on this CPU
  (`onednn.exact_for`: W4 everywhere, symmetric W8 where the CPU has VNNI or AMX), else for W8 split in two
  4-bit halves (`onednn.use_split`, K <= `onednn.SPLIT_MAX_K`);
- everything else (the adaLN / timestep layers on CUDA, static activation scales on CUDA, A16, groups,
  W8 with K > SPLIT_MAX_K on CPU): the torch path (`torch_ops`: torch ops around an exact integer GEMM).

Channel balancing before a CPU kernel (smoothing, then the Hadamard rotation) is `quant.channel_balance`'s, with the
rotation's elementwise part in C++ where it builds (`cpu_balance`, same bits).

`VIDITQ_KERNELS=torch` forces the torch path everywhere (debugging, A/B benchmarks).
"""

from __future__ import annotations

import functools
import os

import torch

from ..quant.channel_balance import balance_activation
from ..quant.formats import unpack_int4
from . import cpu_amx, cpu_balance, cpu_direct, cpu_int16, onednn
from .torch_ops import int_mm, linear_int, linear_reference, linear_weight_only, quantize_activations

MIN_TRITON_ROWS = 17  # below this the GEMM is launch-bound and the torch path is as fast
TRITON_GROUP_MULTIPLE = 64  # the smallest BLOCK_K of triton_gemm's GPU configs: group sizes must be multiples


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fast_kernels_allowed() -> bool:
    """False when `VIDITQ_KERNELS=torch` forces the torch path everywhere."""
    return os.environ.get("VIDITQ_KERNELS", "auto") != "torch"


def use_triton(x: torch.Tensor, act_bits: int, act_scale, scale: torch.Tensor) -> bool:
    """Whether `quantized_linear` takes the Triton path for this call."""
    groups = scale.shape[1]
    return (
        x.is_cuda and act_bits == 8 and act_scale is None and x.shape[0] >= MIN_TRITON_ROWS
        and (groups == 1 or (x.shape[1] // groups) % TRITON_GROUP_MULTIPLE == 0)
        and fast_kernels_allowed() and triton_available()
    )


def use_cpu_balance(x: torch.Tensor, rotation_seed) -> bool:
    """Whether the channel balancing before a CPU kernel rotates in C++ (`cpu_balance`) for this call."""
    return (
        rotation_seed is not None and x.device.type == "cpu" and x.dim() == 2
        and x.dtype in (torch.float32, torch.bfloat16) and fast_kernels_allowed() and cpu_balance.available()
    )


def use_cpu_amx(x: torch.Tensor, act_bits: int, act_scale, scale: torch.Tensor) -> bool:
    """Whether `quantized_linear` takes the AMX kernel (W8 and W4 alike) for this call."""
    return (
        x.device.type == "cpu" and act_bits == 8 and act_scale is None and scale.shape[1] == 1
        and fast_kernels_allowed() and cpu_amx.available()
    )


def use_cpu_direct(x: torch.Tensor, weight_bits: int, act_bits: int, act_scale, scale: torch.Tensor) -> bool:
    """Whether `quantized_linear` takes oneDNN's direct route with the C++ quantization and epilogue."""
    return (
        x.device.type == "cpu" and act_bits == 8 and act_scale is None and scale.shape[1] == 1
        and onednn.exact_for(weight_bits) and fast_kernels_allowed() and cpu_direct.available()
    )


def use_cpu_int16(x: torch.Tensor, weight_bits: int, act_bits: int, act_scale, scale: torch.Tensor) -> bool:
    """Whether `quantized_linear` takes the int16 CPU kernel for this call."""
    return (
        x.device.type == "cpu" and weight_bits == 8 and act_bits == 8 and act_scale is None
        and scale.shape[1] == 1 and x.shape[1] <= cpu_int16.MAX_K and not onednn.exact_for(8)
        and fast_kernels_allowed() and cpu_int16.available()
    )


def use_onednn(x: torch.Tensor, weight_bits: int, act_bits: int, scale: torch.Tensor, zero) -> bool:
    """Whether `quantized_linear` takes the oneDNN path for this call."""
    if onednn.use_split(weight_bits, zero):
        exact = onednn.exact_split() and x.shape[1] <= onednn.SPLIT_MAX_K
    else:
        exact = onednn.exact_for(weight_bits)
    return (
        x.device.type == "cpu" and act_bits == 8 and scale.shape[1] == 1
        and fast_kernels_allowed() and exact
    )


def linear_triton(x, qweight, weight_bits, scale, zero, bias, smooth=None, rotation_seed=None):
    """The fused path: per-token quantization (smoothing and rotation folded in) then the integer GEMM with
    its epilogue."""
    from .triton_gemm import int_gemm
    from .triton_quant import quantize_per_token

    xq, x_scale, rowsum = quantize_per_token(x, 8, smooth, rotation_seed)
    return int_gemm(xq, x_scale, rowsum, qweight, weight_bits, scale, zero, bias, x.dtype)


def quantized_linear(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale=None, smooth=None,
                     rotation_seed=None):
    """Dispatch a quantized linear on a 2-D input `x [M, K]`.

    `qweight`: int8 codes `[N, K]` (W8) or packed int4 `[N, ceil(K / 2)]` (W4); `smooth` `[K]`: channel
    smoothing factors applied to `x` first (`x * smooth` in x's dtype), or None; `rotation_seed`: the
    Hadamard rotation applied after smoothing (`quant.channel_balance.balance_activation`), or None.
    """
    if use_triton(x, act_bits, act_scale, scale):
        return linear_triton(x, qweight, weight_bits, scale, zero, bias, smooth, rotation_seed)
    if use_cpu_balance(x, rotation_seed):
        x = cpu_balance.balance_activation(x, smooth, rotation_seed)
    else:
        x = balance_activation(x, smooth, rotation_seed)  # identity where both are None
    if use_cpu_amx(x, act_bits, act_scale, scale):
        return cpu_amx.linear_amx(x, qweight, weight_bits, scale, zero, bias)
    if use_cpu_direct(x, weight_bits, act_bits, act_scale, scale):
        return cpu_direct.linear_direct(x, qweight, weight_bits, scale, zero, bias)
    if use_cpu_int16(x, weight_bits, act_bits, act_scale, scale):
        return cpu_int16.linear_int16(x, qweight, scale, zero, bias)
    if use_onednn(x, weight_bits, act_bits, scale, zero):
        xq, x_scale = quantize_activations(x, act_bits, act_scale)
        return onednn.linear_onednn(xq, x_scale, qweight, weight_bits, scale, zero, bias, x.dtype)
    codes = unpack_int4(qweight, x.shape[1]) if weight_bits == 4 else qweight
    if act_bits >= 16:
        return linear_weight_only(x, codes, scale, zero, bias)
    return linear_int(x, codes, scale, zero, bias, act_bits, act_scale)


__all__ = [
    "int_mm", "linear_int", "linear_reference", "linear_triton", "linear_weight_only", "quantized_linear",
    "triton_available", "use_cpu_amx", "use_cpu_balance", "use_cpu_direct", "use_cpu_int16", "use_onednn",
    "use_triton",
]
