"""The AMX int8 GEMM with its fused epilogue (`kernels/cpu_amx.py`): bit-identical to the exact torch path for
W8 and W4, symmetric or not, per channel or per tensor, fp32 / bf16 / fp16, at shapes that are not multiples of
the tiles; dispatched for every per-channel A8 layer on CPUs with AMX.

It needs an Intel CPU with AMX-INT8 (Sapphire Rapids or later) under Linux; elsewhere these tests skip and say
so. Where the CPU has AMX the kernel must build here (a C++ compiler and ninja are part of the test setup), so
a failed build fails them. A layer's forward through the dispatch, with its cached weight layout following
in-place changes, is tested in test_cpu_direct.py (which route it takes depends on the CPU)."""

import pytest
import torch

from viditq_diffusers.kernels import LayerCall, cpu_amx, route, select_route
from viditq_diffusers.kernels.torch_ops import linear_int
from tests.support.quantized_weights import random_weights

pytestmark = pytest.mark.skipif(not cpu_amx.cpu_has_amx(), reason="this CPU has no AMX-INT8 (or this is not Linux)")


def activations(m, k, dtype=torch.float32, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 6, k)
    x[0, :5] = 0.0
    if m > 3:
        x[3] = 0.0  # a zero row: scale 0, the output is the bias
    return x.to(dtype)


def test_the_kernel_builds_and_may_use_the_tiles_here():
    assert cpu_amx.available()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (7, 63, 5), (300, 1152, 96), (17, 4608, 24), (6, 1001, 33),
                                   (33, 130, 47), (64, 128, 64)])
@pytest.mark.parametrize("symmetric,per_tensor", [(False, False), (True, False), (False, True)])
def test_matches_the_exact_torch_path_bit_for_bit(bits, m, k, n, symmetric, per_tensor):
    codes, qweight, scale, zero = random_weights(bits, n, k, k, symmetric, per_tensor)
    x = activations(m, k)
    for bias in (torch.randn(n), None):
        assert torch.equal(cpu_amx.linear_amx(x, qweight, bits, scale, zero, bias),
                           linear_int(x, codes, scale, zero, bias, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_half_precision_inputs_match_the_torch_path(dtype, bits):
    codes, qweight, scale, zero = random_weights(bits, 40, 1152)
    x, bias = activations(33, 1152, dtype, seed=2), torch.randn(40).to(dtype)
    out = cpu_amx.linear_amx(x, qweight, bits, scale, zero, bias)
    assert out.dtype == dtype
    assert torch.equal(out, linear_int(x, codes, scale, zero, bias, 8))


def test_extreme_codes_over_a_long_k_stay_exact():
    """Activation codes +-127 against weight codes -128 / 127 over K = 4608: int32 sums up to 75e6, where an fp32
    accumulator would round; the tiles sum in int32."""
    k, g = 4608, torch.Generator().manual_seed(5)
    codes = torch.where(torch.rand(4, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    zero = torch.tensor([[-128], [127], [0], [5]], dtype=torch.int8)
    scale = torch.full((4, 1), 0.01)
    x = torch.stack([torch.where(codes[0] > 0, 1.0, -1.0), torch.randn(k, generator=g) * 0.01])
    assert torch.equal(cpu_amx.linear_amx(x, codes, 8, scale, zero, None), linear_int(x, codes, scale, zero, None, 8))


def test_route_rules(monkeypatch):
    x, amx = torch.randn(32, 128), route("cpu_amx")
    for bits in (8, 4):
        assert select_route(LayerCall(128, 8, bits, 8, asymmetric=True), x).name == "cpu_amx"
    assert "static activation scale" in amx.applies(LayerCall(128, 8, 8, 8, static_act_scale=True), x)
    assert amx.applies(LayerCall(128, 8, 8, 16), x).startswith("A16")
    assert amx.applies(LayerCall(128, 8, 8, 8, groups=2), x) == "group-wise weights"
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert select_route(LayerCall(128, 8, 8, 8), x).name == "torch"


def test_mismatched_operands_are_refused_with_the_reason():
    ext = cpu_amx.extension()
    codes, _, scale, zero = random_weights(8, 40, 256)
    xq, x_scale, rowsum = ext.quantize_s8(torch.randn(8, 320))
    with pytest.raises(RuntimeError, match="K or N does not match"):
        ext.gemm(xq, x_scale, rowsum, ext.pack_weight(codes), 40, zero, scale, None, False)
    with pytest.raises(RuntimeError, match="w_scale must have 1 or N values"):
        ext.gemm(xq, x_scale, rowsum, ext.pack_weight(torch.zeros(40, 320, dtype=torch.int8)), 40, None,
                 torch.ones(3), None, False)
