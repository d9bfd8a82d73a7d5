"""oneDNN's direct int8 route with our C++ quantization and zero-point epilogue (`kernels/cpu_direct.py`):
bit-identical to the exact torch path for W8 and W4, symmetric or not, fp32 / bf16 / fp16, with the rows whose
sums could round in fp32 sent to the torch path; dispatched for W4 everywhere and W8 where oneDNN is exact.

On an x86 CPU with AVX2 the glue must build here (a C++ compiler and ninja are part of the test setup), so a
failed build fails these tests instead of skipping them."""

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import LayerCall, cpu_amx, cpu_direct, cpu_vnni, onednn, route, select_route
from viditq_diffusers.kernels.torch_ops import linear_int
from viditq_diffusers.layer_spec import LayerSpec
from tests.support.cpu import X86_AVX2
from tests.support.quantized_weights import random_weights

pytestmark = pytest.mark.skipif(not X86_AVX2 or not onednn.available(),
                                reason="the direct route is oneDNN's int8 GEMM on x86 CPUs with AVX2")


def exact_here(bits: int):
    if not onednn.exact_for(bits):
        pytest.skip(f"oneDNN's direct int8 GEMM is not exact for W{bits} on this CPU (no VNNI or AMX): "
                    "W8 runs the int16 kernel instead (test_cpu_int16.py)")


def test_the_glue_builds_here():
    assert cpu_direct.available()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,k,n", [(1, 64, 8), (7, 63, 5), (300, 1152, 96), (17, 4608, 24), (6, 1001, 33)])
@pytest.mark.parametrize("symmetric,per_tensor", [(False, False), (True, False), (False, True)])
def test_matches_the_exact_torch_path_bit_for_bit(bits, m, k, n, symmetric, per_tensor):
    exact_here(bits)
    codes, qweight, scale, zero = random_weights(bits, n, k, k, symmetric, per_tensor)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 6, k)
    x[0, :5] = 0.0
    bias = torch.randn(n)
    for b in (bias, None):
        assert torch.equal(cpu_direct.linear_direct(x, qweight, bits, scale, zero, b),
                           linear_int(x, codes, scale, zero, b, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_half_precision_inputs_match_the_torch_path(dtype, bits):
    exact_here(bits)
    codes, qweight, scale, zero = random_weights(bits, 40, 1152)
    x = (torch.randn(33, 1152, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    x[3] = 0.0  # a zero row: scale 0, output the bias
    bias = torch.randn(40)
    out = cpu_direct.linear_direct(x, qweight, bits, scale, zero, bias)
    assert out.dtype == dtype
    assert torch.equal(out, linear_int(x, codes, scale, zero, bias, 8))


def test_rows_whose_sums_could_round_take_the_torch_path():
    """Activation codes +-127 over K = 4608 against weight codes -128 / 127: sums up to 75e6, far beyond 2^24,
    where oneDNN's fp32 result would have rounded; next to an ordinary row."""
    exact_here(8)
    k, g = 4608, torch.Generator().manual_seed(5)
    codes = torch.where(torch.rand(4, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    zero = torch.tensor([[-128], [127], [0], [5]], dtype=torch.int8)
    scale = torch.full((4, 1), 0.01)
    x = torch.stack([torch.where(codes[0] > 0, 1.0, -1.0), torch.randn(k, generator=g) * 0.01])
    expected = linear_int(x, codes, scale, zero, None, 8)
    assert torch.equal(cpu_direct.linear_direct(x, codes, 8, scale, zero, None), expected)


def test_route_rules(monkeypatch):
    x, direct = torch.randn(32, 128), route("cpu_direct")
    assert direct.applies(LayerCall(128, 8, 4, 8), x) is None
    assert (direct.applies(LayerCall(128, 8, 8, 8, asymmetric=True), x) is None) == onednn.exact_for(8)
    assert "static activation scale" in direct.applies(LayerCall(128, 8, 4, 8, static_act_scale=True), x)
    assert direct.applies(LayerCall(128, 8, 4, 16), x).startswith("A16")
    assert direct.applies(LayerCall(128, 8, 4, 8, groups=2), x) == "group-wise weights"
    if not cpu_amx.available() and not cpu_vnni.available():  # the AMX and VNNI kernels come first where they run
        assert select_route(LayerCall(128, 8, 4, 8), x).name == "cpu_direct"
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert "VIDITQ_KERNELS=torch" in direct.applies(LayerCall(128, 8, 4, 8), x)


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_forward_equals_the_torch_path(bits, monkeypatch):
    """Through the dispatch: the AMX kernel on CPUs with AMX, this route elsewhere."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(torch.bfloat16)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, bits, 8))
    x = torch.randn(2, 50, 256, dtype=torch.bfloat16)
    fast = layer(x)
    layer.qweight[:4] = layer.qweight[4:8].clone()  # in place: the cached weight layout must follow
    changed = layer(x)
    assert not torch.equal(changed, fast)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert torch.equal(changed, layer(x))
