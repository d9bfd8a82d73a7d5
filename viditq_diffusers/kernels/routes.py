"""The kernel route table: which implementation runs one quantized linear call, and why the faster ones do not.

A route is a name, one `applies(layer, x)` (None where it applies, else a short reason) and one `run`. `ROUTES`
lists them fastest first and `select_route` takes the first that applies; `torch` always does. Every route
gives the torch route's bits (the kernel tests hold each one to it), so the choice changes speed, never outputs.

Before the CPU routes, channel balancing (smoothing, then the Hadamard rotation) runs on the input: in one C++ pass
per row where `balance_reason` is None (`cpu_balance`: smoothing, scale, the dense `H_p` sum and the butterflies),
else with torch ops (`quant.channel_balance.balance_activation_kernel_order`). It is a pre-step, not a route; the
Triton route folds it into its quantization kernel. All three rotate in `quant.hadamard.rotate_kernel_order`'s
order, so they give the same bits.

Nothing here builds the C++ kernels: a route that needs one not yet loaded says "not built" and a slower route
runs; `kernels.warmup()` builds them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..layer_spec import LayerSpec, precision_label
from ..quant.channel_balance import balance_activation_kernel_order
from ..quant.formats import unpack_int4
from . import cpu_amx, cpu_balance, cpu_direct, cpu_int16, cpu_vnni, onednn
from .torch_ops import linear_int, linear_weight_only, quantize_activations

MIN_TRITON_ROWS = 17  # below this the GEMM is launch-bound and the torch route is as fast
TRITON_GROUP_MULTIPLE = 64  # the smallest BLOCK_K of triton_gemm's GPU configs: group sizes must be multiples
FORCED = "VIDITQ_KERNELS=torch forces the torch route"
logger = logging.getLogger("viditq_diffusers.kernels")


@dataclass(frozen=True)
class LayerCall:
    """What the route choice reads about one quantized layer: its format and shape (not its values)."""

    in_features: int  # K
    out_features: int  # N
    weight_bits: int
    act_bits: int  # 16: weights only
    groups: int = 1  # weight scales per output channel (1: per channel or per tensor; else `K / group_size`)
    asymmetric: bool = False  # weight zero points
    static_act_scale: bool = False  # one calibrated activation scale (the naive baseline), not per token
    smoothed: bool = False
    rotated: bool = False
    per_tensor: bool = False

    @property
    def group_size(self) -> int | None:
        return self.in_features // self.groups if self.groups > 1 else None

    @property
    def label(self) -> str:
        """The format as the plan summary writes it, e.g. "W4A8-g64"."""
        return precision_label(self.weight_bits, self.act_bits, self.group_size, self.per_tensor,
                               self.static_act_scale)

    @classmethod
    def of_op(cls, x, qweight, weight_bits, scale, zero, act_bits, act_scale, smooth, rotation_seed) -> LayerCall:
        """From the arguments of `kernels.quantized_linear` (`x [M, K]`, `scale [N or 1, groups]`)."""
        n = qweight.shape[0]
        return cls(x.shape[1], n, weight_bits, act_bits, scale.shape[1], zero is not None, act_scale is not None,
                   smooth is not None, rotation_seed is not None, scale.shape[0] == 1 and n > 1)

    @classmethod
    def of_spec(cls, spec: LayerSpec, weight_bits: int | None = None) -> LayerCall:
        """From a plan entry (`weight_bits`: another weight width, e.g. the early copy's)."""
        k, size = spec.in_features, spec.group_size
        return cls(k, spec.out_features, weight_bits or spec.weight_bits, spec.act_bits, k // size if size else 1,
                   not spec.symmetric, spec.act_scale is not None, spec.smooth_alpha is not None,
                   spec.rotation_seed is not None, spec.weight_per_tensor)


@dataclass(frozen=True)
class Route:
    name: str
    applies: Callable[[LayerCall, torch.Tensor], str | None]  # None where the route applies, else why not
    run: Callable[..., torch.Tensor]  # (x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth,
    #                                    rotation_seed), as `kernels.quantized_linear`


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fast_kernels_allowed() -> bool:
    """False when `VIDITQ_KERNELS=torch` forces the torch route everywhere."""
    return os.environ.get("VIDITQ_KERNELS", "auto") != "torch"


# --- the conditions ---------------------------------------------------------------------------------------------

def _activation_reason(layer: LayerCall, static_ok: bool = False) -> str | None:
    if layer.act_bits >= 16:
        return "A16: weights only, the activations stay floating point"
    if layer.act_bits != 8:
        return f"A{layer.act_bits} activations (the integer kernels take A8)"
    if layer.static_act_scale and not static_ok:
        return "static activation scale (the naive baseline): the kernel quantizes per token"
    return None


def _cpu_int8_reason(layer: LayerCall, x: torch.Tensor, static_ok: bool = False, grouped_ok: bool = False
                     ) -> str | None:
    """What every CPU integer route needs: an A8 call on a CPU tensor with per-channel (or per-tensor) weights
    (`grouped_ok`: group-wise ones too)."""
    if not fast_kernels_allowed():
        return FORCED
    if x.device.type != "cpu":
        return "not a CPU tensor"
    reason = _activation_reason(layer, static_ok)
    if reason:
        return reason
    if layer.groups > 1 and not grouped_ok:
        return "group-wise weights"
    return None


def _onednn_inexact_reason(weight_bits: int) -> str:
    if not onednn.available():
        return "this torch build has no oneDNN int8 ops"
    return f"oneDNN's direct int8 GEMM is not exact for W{weight_bits} on this CPU (no VNNI/AMX)"


def _needs_split(layer: LayerCall) -> bool:
    """8-bit weights whose `code - zero` does not fit int8, or where the direct GEMM saturates on this CPU."""
    return layer.weight_bits == 8 and (layer.asymmetric or not onednn.exact_for(8))


def triton_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    if not fast_kernels_allowed():
        return FORCED
    if not x.is_cuda:
        return "not a CUDA tensor"
    reason = _activation_reason(layer)
    if reason:
        return reason
    if x.shape[0] < MIN_TRITON_ROWS:
        return f"{x.shape[0]} rows: below {MIN_TRITON_ROWS} the GEMM is launch-bound and the torch route is as fast"
    if layer.groups > 1 and layer.group_size % TRITON_GROUP_MULTIPLE:
        return f"group size {layer.group_size} is not a multiple of {TRITON_GROUP_MULTIPLE} (the GEMM's K block)"
    if not triton_available():
        return "Triton is not installed"
    return None


def cpu_amx_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    return _cpu_int8_reason(layer, x) or cpu_amx.missing_reason()


def cpu_vnni_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    return _cpu_int8_reason(layer, x) or cpu_vnni.missing_reason()


def cpu_direct_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    reason = _cpu_int8_reason(layer, x)
    if reason:
        return reason
    if not onednn.exact_for(layer.weight_bits):
        return _onednn_inexact_reason(layer.weight_bits)
    return cpu_direct.missing_reason()


def cpu_int16_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    reason = _cpu_int8_reason(layer, x)
    if reason:
        return reason
    if layer.weight_bits != 8:
        return "4-bit weights: oneDNN's int8 GEMM is exact for them and faster"
    if layer.in_features > cpu_int16.MAX_K:
        return f"K = {layer.in_features} > {cpu_int16.MAX_K}: its int32 sums could overflow"
    if onednn.exact_for(8):
        return "oneDNN's direct int8 GEMM is exact for W8 on this CPU, and faster"
    return cpu_int16.missing_reason()


def cpu_group_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    reason = _cpu_int8_reason(layer, x, grouped_ok=True)
    if reason:
        return reason
    if layer.groups == 1:
        return "per-channel weights: this route is for group-wise ones"
    size = layer.group_size
    if size * layer.groups != layer.in_features or size % 2:
        return f"group size {layer.in_features / layer.groups:g} is not even (the kernel multiplies K in pairs)"
    if size > cpu_int16.MAX_K:
        return f"group size {size} > {cpu_int16.MAX_K}: a group's int32 sum could overflow"
    return cpu_int16.missing_reason()


def onednn_direct_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    reason = _cpu_int8_reason(layer, x, static_ok=True)
    if reason:
        return reason
    if layer.weight_bits == 8 and layer.asymmetric:
        return "8-bit weights with zero points: code - zero does not fit oneDNN's int8 weights"
    if not onednn.exact_for(layer.weight_bits):
        return _onednn_inexact_reason(layer.weight_bits)
    return None


def onednn_split_reason(layer: LayerCall, x: torch.Tensor) -> str | None:
    reason = _cpu_int8_reason(layer, x, static_ok=True)
    if reason:
        return reason
    if layer.weight_bits != 8:
        return "4-bit weights are not split"
    if not onednn.available():
        return _onednn_inexact_reason(8)
    if not _needs_split(layer):
        return "symmetric W8: the direct GEMM is exact on this CPU"
    if not onednn.exact_split():
        return "oneDNN's int8 GEMM is not exact for 4-bit halves on this CPU"
    if layer.in_features > onednn.SPLIT_MAX_K:
        return f"K = {layer.in_features} > {onednn.SPLIT_MAX_K}: a half's sum could round in fp32"
    return None


def balance_reason(rotated: bool, x: torch.Tensor) -> str | None:
    """None where the rotation before a CPU route runs in C++ (`cpu_balance`), else why torch ops do it."""
    if not rotated:
        return "no rotation (smoothing alone is one torch multiply)"
    if not fast_kernels_allowed():
        return FORCED
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if x.dim() != 2:
        return "not a 2-D input"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"{x.dtype} input: the C++ rotation rounds as torch for float32 and bfloat16 only"
    return cpu_balance.missing_reason()


def balance_name(layer: LayerCall, x: torch.Tensor, route: Route) -> str:
    """How this call balances its input: "none", "fused" (the Triton route), "cpu_balance" or "torch"."""
    if not (layer.smoothed or layer.rotated):
        return "none"
    if route.name == "triton":
        return "fused"
    return "cpu_balance" if balance_reason(layer.rotated, x) is None else "torch"


# --- the implementations ----------------------------------------------------------------------------------------

def balanced(x: torch.Tensor, smooth, rotation_seed) -> torch.Tensor:
    """`x diag(smooth) R` before a CPU or torch route: the C++ rotation where it applies, same bits either way."""
    if balance_reason(rotation_seed is not None, x) is None:
        return cpu_balance.balance_activation(x, smooth, rotation_seed)
    return balance_activation_kernel_order(x, smooth, rotation_seed)  # identity where both are None


def linear_triton(x, qweight, weight_bits, scale, zero, bias, smooth=None, rotation_seed=None):
    """The fused route: per-token quantization (smoothing and rotation folded in) then the integer GEMM with
    its epilogue."""
    from .triton_gemm import int_gemm
    from .triton_quant import quantize_per_token

    xq, x_scale, rowsum = quantize_per_token(x, 8, smooth, rotation_seed)
    return int_gemm(xq, x_scale, rowsum, qweight, weight_bits, scale, zero, bias, x.dtype)


def _run_triton(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    return linear_triton(x, qweight, weight_bits, scale, zero, bias, smooth, rotation_seed)


def _run_cpu_amx(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    return cpu_amx.linear_amx(balanced(x, smooth, rotation_seed), qweight, weight_bits, scale, zero, bias)


def _run_cpu_vnni(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    return cpu_vnni.linear_vnni(balanced(x, smooth, rotation_seed), qweight, weight_bits, scale, zero, bias)


def _run_cpu_direct(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    return cpu_direct.linear_direct(balanced(x, smooth, rotation_seed), qweight, weight_bits, scale, zero, bias)


def _run_cpu_int16(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    return cpu_int16.linear_int16(balanced(x, smooth, rotation_seed), qweight, scale, zero, bias)


def _run_cpu_group(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    return cpu_int16.linear_grouped(balanced(x, smooth, rotation_seed), qweight, weight_bits, scale, zero, bias)


def _onednn_runner(split: bool):
    def run(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
        x = balanced(x, smooth, rotation_seed)
        xq, x_scale = quantize_activations(x, act_bits, act_scale)
        return onednn.linear_onednn(xq, x_scale, qweight, weight_bits, scale, zero, bias, x.dtype, split)
    return run


def _run_torch(x, qweight, weight_bits, scale, zero, bias, act_bits, act_scale, smooth, rotation_seed):
    x = balanced(x, smooth, rotation_seed)
    codes = unpack_int4(qweight, x.shape[1]) if weight_bits == 4 else qweight
    if act_bits >= 16:
        return linear_weight_only(x, codes, scale, zero, bias)
    return linear_int(x, codes, scale, zero, bias, act_bits, act_scale)


ROUTES: tuple[Route, ...] = (  # fastest first
    Route("triton", triton_reason, _run_triton),
    Route("cpu_amx", cpu_amx_reason, _run_cpu_amx),
    Route("cpu_vnni", cpu_vnni_reason, _run_cpu_vnni),  # AVX-512 VNNI CPUs; on AMX ones where the tiles are refused
    Route("cpu_direct", cpu_direct_reason, _run_cpu_direct),
    Route("cpu_int16", cpu_int16_reason, _run_cpu_int16),
    Route("cpu_group", cpu_group_reason, _run_cpu_group),  # group-wise weights, on the int16 kernel's GEMM
    Route("onednn_direct", onednn_direct_reason, _onednn_runner(split=False)),
    Route("onednn_split", onednn_split_reason, _onednn_runner(split=True)),
    Route("torch", lambda layer, x: None, _run_torch),  # torch ops around an exact integer GEMM (A16: a float one)
)
ROUTE_NAMES = tuple(route.name for route in ROUTES)


def route(name: str) -> Route:
    """The route called `name` (one of `ROUTE_NAMES`)."""
    for candidate in ROUTES:
        if candidate.name == name:
            return candidate
    raise ValueError(f"no kernel route {name!r}; the routes are {', '.join(ROUTE_NAMES)}")


def select_route(layer: LayerCall, x: torch.Tensor) -> Route:
    """The fastest route that applies to this call (`torch` always does)."""
    for route in ROUTES:
        if route.applies(layer, x) is None:
            return route
    raise AssertionError("the torch route always applies")


def explain(layer: LayerCall, x: torch.Tensor) -> list[tuple[str, str | None]]:
    """(route name, why it does not apply) for each route down to the one taken, whose reason is None."""
    rows = []
    for route in ROUTES:
        reason = route.applies(layer, x)
        rows.append((route.name, reason))
        if reason is None:
            break
    return rows


# --- VIDITQ_LOG_ROUTES=1 ----------------------------------------------------------------------------------------

_logged: set[tuple] = set()


def log_routes_enabled() -> bool:
    return os.environ.get("VIDITQ_LOG_ROUTES", "") not in ("", "0")


def describe(layer: LayerCall, x: torch.Tensor, route: Route) -> str:
    """One line: the call, the route it takes, its balancing and why each faster route does not apply."""
    kind = ", ".join(["asym" if layer.asymmetric else "sym"] + (["smoothed"] if layer.smoothed else [])
                     + (["rotated"] if layer.rotated else []))
    skipped = "; ".join(f"{name}: {reason}" for name, reason in explain(layer, x) if reason)
    return (f"{layer.label} ({kind}) {layer.in_features}->{layer.out_features}, {x.device.type} "
            f"{str(x.dtype).removeprefix('torch.')} [{x.shape[0]}, {x.shape[1]}] -> {route.name} "
            f"(balancing: {balance_name(layer, x, route)})"
            + (f"; faster routes skipped: {skipped}" if skipped else ""))


def log_route(layer: LayerCall, x: torch.Tensor, route: Route) -> None:
    """Log each distinct (layer format and shape, input device and dtype, route) once. The op does not know the
    layer's name: layers of one shape and format share a line."""
    key = (layer, x.device.type, x.dtype, route.name)
    if key in _logged:
        return
    if not _logged and not logger.hasHandlers():  # nobody configured logging: still show what was asked for
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if not _logged and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    _logged.add(key)
    logger.info("viditq route: %s", describe(layer, x, route))
