"""The int16 CPU kernel for W8A8 (`kernels/cpu_int16.cpp`): bit-identical to the exact torch path, at the
widest codes too, and dispatched only where oneDNN's direct int8 GEMM would saturate.

On an x86 CPU with AVX2 the kernel must build here (a C++ compiler and ninja are part of the test setup), so
a failed build fails these tests instead of skipping them."""

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import LayerCall, cpu_amx, cpu_int16, onednn, route, select_route
from viditq_diffusers.kernels.torch_ops import linear_int
from viditq_diffusers.layer_spec import LayerSpec
from tests.support.cpu import X86_AVX2
from tests.support.quantized_weights import random_weights

pytestmark = pytest.mark.skipif(not X86_AVX2, reason="the int16 kernel is for x86 CPUs with AVX2")


def test_the_kernel_builds_here():
    assert cpu_int16.available()


# (301, 4608, 24): rows in several L2 chunks, each with K-block partial sums
@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (7, 63, 5), (300, 1152, 96), (17, 4608, 24), (301, 4608, 24),
                                   (6, 1001, 33)])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_the_exact_torch_path_bit_for_bit(m, k, n, per_tensor, symmetric):
    codes, _, scale, zero = random_weights(8, n, k, k, symmetric, per_tensor)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 6, k)
    x[0, :5] = 0.0  # exact zeros and a half-way code: round half to even as torch
    bias = torch.randn(n)
    for b in (bias, None):
        assert torch.equal(cpu_int16.linear_int16(x, codes, scale, zero, b), linear_int(x, codes, scale, zero, b, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_the_torch_path(dtype):
    codes, _, scale, zero = random_weights(8, 40, 256)
    x = (torch.randn(9, 256, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    bias = torch.randn(40)
    out = cpu_int16.linear_int16(x, codes, scale, zero, bias)
    assert out.dtype == dtype
    assert torch.equal(out, linear_int(x, codes, scale, zero, bias, 8))


def test_exact_at_the_widest_codes():
    """Activation codes +-127 (per-token scales never give more) against `code - zero` at -255 / +255 over a
    long K, signs matched: sums far beyond 2^24, where the int32 accumulator's conversion to fp32 rounds."""
    k, g = 4608, torch.Generator().manual_seed(5)
    codes = torch.where(torch.rand(4, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    zero = torch.tensor([[127], [-128], [0], [5]], dtype=torch.int8)
    d = codes.to(torch.int64) - zero.to(torch.int64)
    x = torch.where(d < 0, -127.0, 127.0)  # absmax 127: scale 1, codes +-127 exactly
    out = cpu_int16.linear_int16(x, codes, torch.ones(4, 1), zero, None)
    exact = x.to(torch.int64) @ d.T
    assert exact.abs().max() > 2**26
    assert torch.equal(out, exact.to(torch.float32))  # the int32 accumulator, converted once, as the torch path
    assert torch.equal(out, linear_int(x, codes, torch.ones(4, 1), zero, None, 8))


def test_a_zero_row_gives_the_bias():
    codes, _, scale, zero = random_weights(8, 16, 96)
    bias = torch.randn(16)
    out = cpu_int16.linear_int16(torch.zeros(3, 96), codes, scale, zero, bias)
    assert torch.equal(out, bias.expand(3, 16))


def test_route_rules():
    x, int16 = torch.randn(20, 128), route("cpu_int16")
    w8 = LayerCall(128, 8, 8, 8, asymmetric=True)
    assert (int16.applies(w8, x) is None) == (not onednn.exact_for(8))  # VNNI/AMX: oneDNN direct is exact
    if not onednn.exact_for(8) and not cpu_amx.available():
        assert select_route(w8, x).name == "cpu_int16"
    assert int16.applies(LayerCall(128, 8, 4, 8), x).startswith("4-bit weights")  # oneDNN is exact and faster
    assert "static activation scale" in int16.applies(LayerCall(128, 8, 8, 8, static_act_scale=True), x)
    assert int16.applies(LayerCall(128, 8, 8, 8, groups=2), x) == "group-wise weights"
    assert int16.applies(LayerCall(128, 8, 8, 16), x).startswith("A16")
    wide = torch.randn(2, cpu_int16.MAX_K + 1)
    assert "overflow" in int16.applies(LayerCall(wide.shape[1], 8, 8, 8), wide)  # int32 sums could overflow


def test_module_forward_equals_the_torch_path(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 8, 8))
    x = torch.randn(2, 21, 96) * torch.linspace(0.2, 4, 96)
    fast = layer(x)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert select_route(LayerCall(96, 40, 8, 8, asymmetric=True), x.reshape(-1, 96)).name == "torch"
    assert torch.equal(fast, layer(x))


def test_the_packed_weight_follows_in_place_changes():
    codes, _, scale, zero = random_weights(8, 16, 64)
    x = torch.randn(9, 64)
    first = cpu_int16.linear_int16(x, codes, scale, zero, None)
    codes.neg_()  # e.g. load_state_dict into an existing layer
    second = cpu_int16.linear_int16(x, codes, scale, zero, None)
    assert not torch.equal(first, second)
    assert torch.equal(second, linear_int(x, codes, scale, zero, None, 8))
    zero.add_(3)  # the zero points too
    assert torch.equal(cpu_int16.linear_int16(x, codes, scale, zero, None), linear_int(x, codes, scale, zero, None, 8))
