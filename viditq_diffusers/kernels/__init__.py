"""The quantized linear's kernels, and the route table that picks one per call (`routes.py`).

Routes, fastest first; a call takes the first whose conditions hold (`routes.select_route`), and every route
gives the torch route's bits:

- `triton`: CUDA tensors, A8 with per-token scales, 17 tokens or more, group sizes that are multiples of 64:
  the fused Triton kernels (`triton_quant`, smoothing and rotation included, + `triton_gemm`);
- `cpu_amx`: CPU, A8 per token, per-channel weights, Intel CPUs with AMX: our AMX int8 GEMM, epilogue fused;
- `cpu_vnni`: the same on x86 CPUs with AVX-512 VNNI (and no AMX, or tiles the OS refuses): our `vpdpbusd` int8
  GEMM, quantization and epilogue fused;
- `cpu_direct`: the same where oneDNN's direct int8 GEMM is exact (W4 everywhere, W8 on x86 with VNNI or
  AMX): that GEMM between our C++ quantization and zero-point epilogue;
- `cpu_int16`: the same for W8 where oneDNN's direct GEMM is not exact (x86 without VNNI): our int16 kernel;
- `cpu_group`: CPU, A8 per token, group-wise weights (W8 and W4, even group sizes), any x86 CPU with AVX2: the
  int16 kernel's GEMM with the group scales applied in fp32 per group;
- `onednn_direct` / `onednn_split`: CPU, A8 (static scales too), per-channel weights, where the C++ kernels
  are not built: oneDNN's int8 GEMM with torch ops around it, directly where exact, else (W8 with zero points,
  or without VNNI) in two 4-bit halves (K <= `onednn.SPLIT_MAX_K`);
- `torch`: everything else (adaLN / timestep layers and static scales on CUDA, A16, group-wise weights with
  static scales or where the C++ kernels are not built, ...): torch ops around an exact integer GEMM
  (`torch_ops`; A16 a float GEMM on dequantized weights).

NaN and Inf give the torch route's outputs too (tests/unit/test_nonfinite.py, test_kernel_properties.py): a NaN in an
input row makes its output row NaN; an Inf (and no NaN) makes it +-Inf or NaN, never finite (unrotated, a lone Inf
gives the sign of FP's `Inf * w`), also with static activation scales; a NaN or Inf weight scale reaches its output
channel.
`quant.formats.round_to_codes` defines the codes; every kernel takes the same steps.

Before a CPU route the input's channel balancing rotates in C++ where it can (`cpu_balance`, same bits).
The C++ CPU kernels are built (once per machine) or loaded by `warmup()`, which the CLI and the apps call at
start and the first quantized forward on CPU calls otherwise; the route choice itself never builds.

`VIDITQ_KERNELS=torch` forces the torch route everywhere (debugging, A/B benchmarks); `VIDITQ_LOG_ROUTES=1` logs
each layer's route once (per distinct format and shape); `viditq info --kernels DIR` prints them per layer.
"""

from __future__ import annotations

import sys
import threading

from . import cpu_amx, cpu_balance, cpu_build, cpu_direct, cpu_int16, cpu_vnni, onednn
from .routes import (ROUTE_NAMES, ROUTES, LayerCall, Route, balance_reason, explain, fast_kernels_allowed,
                     linear_triton, log_route, log_routes_enabled, route, select_route,
                     triton_available)
from .torch_ops import int_mm, linear_int, linear_reference, linear_weight_only, quantize_activations

_warm = False
_warm_lock = threading.Lock()


def warmup(verbose: bool = True) -> dict[str, str | None]:
    """Build (first time on this machine, torch install and checkout; about a minute) or load the C++ CPU kernels this
    CPU's routes use; {kernel: None where loaded, else why not}. `verbose` prints a line to stderr before a
    build. Idempotent and cheap once done."""
    global _warm
    with _warm_lock:
        # cpu_int16 on every x86 CPU: group-wise weights run on it (route cpu_group), and W8 where oneDNN saturates
        wanted = [cpu_direct, cpu_int16, cpu_balance] if onednn.exact_for(4) else [cpu_int16, cpu_balance]
        if cpu_vnni.cpu_has_vnni():
            wanted.insert(0, cpu_vnni)
        if cpu_amx.cpu_has_amx():
            wanted.insert(0, cpu_amx)
        if cpu_build.unsupported_reason() is None:
            fresh = [m.NAME for m in wanted if cpu_build.loaded(m.NAME) is None and not cpu_build.is_compiled(m.NAME)]
            if fresh and verbose:
                print(f"viditq: building the C++ CPU kernels ({', '.join(fresh)}; once per machine, torch install and "
                      f"checkout, about a minute) in {cpu_build.build_directory('')}", file=sys.stderr, flush=True)
            for module in wanted:
                module.build()
        _warm = True
    reasons = {m.NAME: m.missing_reason() for m in (cpu_amx, cpu_vnni, cpu_direct, cpu_int16, cpu_balance)}
    if cpu_direct not in wanted and reasons[cpu_direct.NAME]:
        reasons[cpu_direct.NAME] = "not used: this torch build has no oneDNN int8 ops"
    return reasons


def quantized_linear(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale=None, smooth=None,
                     rotation_seed=None):
    """A quantized linear on a 2-D input `x [M, K]`, by the fastest route that applies (`routes.select_route`).

    `qweight`: int8 codes `[N, K]` (W8) or packed int4 `[N, ceil(K / 2)]` (W4); `scale` fp32 `[N, G]` (or
    `[1, 1]` per tensor); `zero` int8 like `scale`, or None; `smooth` `[K]`: channel smoothing factors applied
    to `x` first (`x * smooth` in x's dtype), or None; `rotation_seed`: the Hadamard rotation applied after
    smoothing (`quant.channel_balance.balance_activation_kernel_order`, on every route), or None.
    """
    if not _warm and x.device.type == "cpu" and fast_kernels_allowed():
        warmup()  # once: plain library use (diffusers, scripts) gets the C++ routes too
    layer = LayerCall.of_op(x, qweight, weight_bits, scale, zero, act_bits, act_scale, smooth, rotation_seed)
    route = select_route(layer, x)
    if log_routes_enabled():
        log_route(layer, x, route)
    return route.run(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed)


__all__ = [
    "LayerCall", "ROUTES", "ROUTE_NAMES", "Route", "balance_reason", "explain", "fast_kernels_allowed", "int_mm",
    "linear_int", "linear_reference", "linear_triton", "linear_weight_only", "quantize_activations",
    "quantized_linear", "route", "select_route", "triton_available", "warmup",
]
