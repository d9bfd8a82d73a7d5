"""Property tests (hypothesis) of the quantized linear's kernel routes (issue 25, item 6): random shapes (M = 1, K
not a multiple of any block), dtypes, formats, NaN / Inf positions and extreme values, each route this machine can
run held to the torch path (the contract in tests/support/kernel_routes.py).

Deterministic: `derandomize=True` draws the same examples on every run; the case counts are `CPU_CASES` and
`TRITON_CASES`."""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from viditq_diffusers.kernels import LayerCall, select_route, triton_available
from viditq_diffusers.quant.formats import pack_int4, quantize_weight
from tests.support.kernel_routes import (assert_route_matches, interpreter_exact_rows, run_route, runnable_routes,
                                         torch_path, triton_reference)

CPU_CASES = 120
TRITON_CASES = 30
ROTATABLE_K = (8, 16, 24, 48, 64, 96)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPECIALS = (float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 6e4, 1e-40, 0.0)
FAST = settings(max_examples=CPU_CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def calls(draw, per_token_only=False):
    """The arguments of one `kernels.quantized_linear` call (act_bits 8) and the call's `LayerCall`."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rotated = draw(st.booleans())
    k = draw(st.sampled_from(ROTATABLE_K)) if rotated else draw(st.integers(1, 150))
    m, n = draw(st.integers(1, 24)), draw(st.integers(1, 20))
    bits, symmetric = draw(st.sampled_from((4, 8))), draw(st.booleans())
    group = draw(st.sampled_from([None] + [s for s in (8, 32) if k % s == 0 and k > s]))
    per_tensor = group is None and draw(st.booleans())
    static = not per_token_only and draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))

    w = torch.randn(n, k, generator=g) * 10.0 ** draw(st.integers(-3, 2))
    codes, scale, zero = quantize_weight(w, bits, group, symmetric, per_tensor)
    for _ in range(draw(st.integers(0, 2))):  # hand-edited weight scales
        scale[draw(st.integers(0, scale.shape[0] - 1)), draw(st.integers(0, scale.shape[1] - 1))] = draw(
            st.sampled_from((float("nan"), float("inf"), 0.0, 1e30)))
    x = torch.randn(m, k, generator=g) * 10.0 ** draw(st.integers(-38, 36))
    for _ in range(draw(st.integers(0, 4))):  # NaN, Inf, huge and tiny values anywhere
        x[draw(st.integers(0, m - 1)), draw(st.integers(0, k - 1))] = draw(st.sampled_from(SPECIALS))
    if draw(st.booleans()):  # a whole special row
        x[draw(st.integers(0, m - 1))] = draw(st.sampled_from(SPECIALS))
    x = x.to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if draw(st.booleans()) else None
    smooth = torch.rand(k, generator=g) + 0.5 if draw(st.booleans()) else None
    act_scale = torch.tensor(draw(st.sampled_from((1e-3, 0.05, 2.0)))) if static else None
    args = (x, pack_int4(codes) if bits == 4 else codes, bits, scale, zero, bias, act_scale, smooth,
            3 if rotated else None)
    layer = LayerCall.of_op(x, args[1], bits, scale, zero, 8, act_scale, smooth, args[8])
    return layer, args


def check(layer, args, names, monkeypatch):
    expected = torch_path(*args, monkeypatch=monkeypatch)
    for name in names:
        if name == "triton":
            x, (qweight, bits, scale, zero, bias) = args[0], args[1:6]
            reference = triton_reference(x, qweight, bits, scale, zero, bias, args[7], args[8])
            rows = interpreter_exact_rows(x)
            assert_route_matches(name, run_route(name, *args)[rows], reference[rows], layer.label)
        else:
            assert_route_matches(name, run_route(name, *args), expected, layer.label)


@FAST
@given(case=calls())
def test_cpu_routes_match_the_torch_path(case, monkeypatch):
    layer, args = case
    names = [name for name in runnable_routes(layer) if name != "triton"]
    assert select_route(layer, args[0]).name in names
    check(layer, args, names, monkeypatch)


@pytest.mark.skipif(not triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton route on CPU tensors needs Triton and its interpreter (TRITON_INTERPRET=1)")
@settings(FAST, max_examples=TRITON_CASES, phases=(Phase.explicit, Phase.generate))  # interpreted: no shrinking
@given(case=calls(per_token_only=True))
def test_triton_route_matches_the_torch_path(case, monkeypatch):
    layer, args = case
    assume("triton" in runnable_routes(layer))  # group sizes the interpreted GEMM's block divides
    check(layer, args, ["triton"], monkeypatch)
