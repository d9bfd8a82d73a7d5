"""Every kernel route this machine can run for one quantized linear call, forced, and the contract each one is
held to against the torch path (test_nonfinite.py, test_kernel_properties.py).

The contract: where the torch path's output is finite, the same bits (the Triton route: within one unit in the
last place, its documented bound); where it is not, NaN at the same positions and Inf at the same positions with
the same sign (NaN payloads may differ)."""

import os

import torch

from viditq_diffusers.kernels import (LayerCall, cpu_amx, cpu_direct, cpu_int16, cpu_vnni, onednn, route,
                                      triton_available)
from viditq_diffusers.kernels.torch_ops import linear_int
from viditq_diffusers.quant.formats import unpack_int4

INTERPRETED_BLOCK_K = 32  # triton_gemm's one config under TRITON_INTERPRET: group sizes must be multiples


def runnable_routes(layer: LayerCall) -> list[str]:
    """The routes that can run `layer` here when forced, also those a faster route hides (e.g. cpu_int16 where
    oneDNN is exact for W8) and Triton on CPU tensors under Triton's interpreter; "torch" first."""
    names = ["torch"]
    if layer.act_bits != 8:
        return names
    per_channel = layer.groups == 1
    per_token = not layer.static_act_scale
    if per_token and triton_available() and os.environ.get("TRITON_INTERPRET") == "1" and (
            per_channel or layer.group_size % INTERPRETED_BLOCK_K == 0):
        names.append("triton")
    if not per_channel:
        if per_token and cpu_int16.available() and layer.group_size % 2 == 0 and layer.group_size <= cpu_int16.MAX_K:
            names.append("cpu_group")
        return names
    if per_token and cpu_amx.available():
        names.append("cpu_amx")
    if per_token and cpu_vnni.available():
        names.append("cpu_vnni")
    if per_token and cpu_direct.available() and onednn.exact_for(layer.weight_bits):
        names.append("cpu_direct")
    if per_token and cpu_int16.available() and layer.weight_bits == 8 and layer.in_features <= cpu_int16.MAX_K:
        names.append("cpu_int16")
    if onednn.available() and onednn.exact_for(layer.weight_bits) and not (
            layer.weight_bits == 8 and layer.asymmetric):
        names.append("onednn_direct")
    if onednn.available() and layer.weight_bits == 8 and onednn.exact_split() and (
            layer.in_features <= onednn.SPLIT_MAX_K):
        names.append("onednn_split")
    return names


def run_route(name, x, qweight, bits, scale, zero, bias, act_scale=None, smooth=None, rotation_seed=None):
    return route(name).run(x, qweight, bits, scale, zero, bias, 8, act_scale, smooth, rotation_seed)


def torch_path(x, qweight, bits, scale, zero, bias, act_scale=None, smooth=None, rotation_seed=None,
               monkeypatch=None):
    """The torch route with `VIDITQ_KERNELS=torch` (so its balancing runs in torch too)."""
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    try:
        return run_route("torch", x, qweight, bits, scale, zero, bias, act_scale, smooth, rotation_seed)
    finally:
        monkeypatch.delenv("VIDITQ_KERNELS")


def triton_reference(x, qweight, bits, scale, zero, bias, smooth=None, rotation_seed=None):
    """What the Triton route is held to: the torch path on the input balanced in the kernel's order (its
    rotation sums in another order than torch's `rotate`)."""
    from viditq_diffusers.quant.hadamard import rotate_kernel_order

    if smooth is not None:
        x = x * smooth.to(x.dtype)
    if rotation_seed is not None:
        x = rotate_kernel_order(x, rotation_seed)
    codes = unpack_int4(qweight, x.shape[1]) if bits == 4 else qweight
    return linear_int(x, codes, scale, zero, bias, 8)


def interpreter_exact_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` Triton's CPU interpreter reads exactly: it converts bf16 subnormals to fp32 wrongly (e.g.
    1e-40 to 0; a GPU converts them exactly), so rows holding one are left out of the Triton route's comparison
    there."""
    if x.dtype != torch.bfloat16 or os.environ.get("TRITON_INTERPRET") != "1":
        return torch.ones(x.shape[0], dtype=torch.bool)
    subnormal = (x != 0) & (x.abs() < torch.finfo(torch.bfloat16).tiny)
    return ~subnormal.any(dim=1)


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """NaN where expected is NaN, +Inf / -Inf where it is +Inf / -Inf, and nowhere else."""
    for kind, mask in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                       ("-Inf", lambda t: t == float("-inf"))):
        a, e = mask(actual), mask(expected)
        if not torch.equal(a, e):
            where = (a != e).nonzero()[:5].tolist()
            raise AssertionError(f"{what}: {kind} positions differ at {where}: got {actual[tuple(zip(*where))]}, "
                                 f"the torch path gives {expected[tuple(zip(*where))]}")


def assert_route_matches(name: str, actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """The contract (module docstring) for route `name`."""
    what = f"{what} route {name}"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert_same_nonfinite(actual, expected, what)
    finite = torch.isfinite(expected)
    a, e = actual[finite], expected[finite]
    if name != "triton":
        if not torch.equal(a, e):
            worst = (a.double() - e.double()).abs().argmax()
            raise AssertionError(f"{what}: finite outputs differ, e.g. {a[worst].item()} vs {e[worst].item()}")
        return
    ulp = (torch.nextafter(e.abs(), torch.tensor(float("inf"), dtype=e.dtype)) - e.abs()).double()
    assert bool(((a.double() - e.double()).abs() <= ulp).all()), f"{what}: finite outputs beyond one ulp"
