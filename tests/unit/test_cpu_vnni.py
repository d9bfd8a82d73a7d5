"""The AVX-512 VNNI int8 GEMM with quantization and epilogue fused (`kernels/cpu_vnni.py`): bit-identical to the exact
torch path for W8 and W4, symmetric or not, per channel or per tensor, fp32 / bf16 / fp16, NaN / Inf / zero rows,
strided inputs, at shapes that are not multiples of its tiles; dispatched for per-channel A8 layers on CPUs with
AVX-512 VNNI and no AMX.

It needs an x86 CPU with AVX-512 VNNI; elsewhere these tests skip and say so (the route's reason there is tested on
every machine). Where the CPU has VNNI the kernel must build here (a C++ compiler and ninja are part of the test
setup), so a failed build fails them."""

import pytest
import torch

from viditq_diffusers.kernels import LayerCall, cpu_amx, cpu_vnni, route, select_route, warmup
from viditq_diffusers.kernels.torch_ops import linear_int
from viditq_diffusers.quant.formats import quantize_activation_per_token
from tests.support.kernel_routes import assert_route_matches
from tests.support.quantized_weights import random_weights

NAN, INF = float("nan"), float("inf")
needs_vnni = pytest.mark.skipif(not cpu_vnni.cpu_has_vnni(), reason="this CPU has no AVX-512 VNNI")
WEIGHTS = [(False, False), (True, False), (False, True)]  # (symmetric, per_tensor)
WEIGHT_IDS = ["asym", "sym", "per-tensor"]


@pytest.fixture(scope="module", autouse=True)
def built():
    if cpu_vnni.cpu_has_vnni():
        warmup(verbose=False)


def activations(m, k, dtype=torch.float32, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 6, k)
    x[0, :5] = 0.0
    if m > 3:
        x[3] = 0.0  # a zero row: scale 0, the output is the bias
    return x.to(dtype)


def check(x, bits, n, symmetric=False, per_tensor=False, seed=0):
    codes, qweight, scale, zero = random_weights(bits, n, x.shape[1], seed, symmetric, per_tensor)
    for bias in (torch.randn(n, generator=torch.Generator().manual_seed(seed)), None):
        out = cpu_vnni.linear_vnni(x, qweight, bits, scale, zero, bias)
        expected = linear_int(x, codes, scale, zero, bias, 8)
        assert out.dtype == x.dtype
        assert_route_matches("cpu_vnni", out, expected, f"W{bits} {tuple(x.shape)} -> {n}")
        if torch.isfinite(expected).all():
            assert torch.equal(out, expected)


@needs_vnni
def test_the_kernel_builds_here():
    assert cpu_vnni.available()


# M: a lone token, a row panel's tail, 2 panels + 1, whole panels, many; K: multiples of 4 and not (the kernel pads
# K to quads); N: within one 48-column panel, whole panels, ragged, and the DiT width
SHAPES = [(1, 64, 16), (3, 96, 48), (17, 1152, 50), (64, 4608, 16), (300, 1152, 97), (1, 4608, 1152),
          (3, 63, 5), (17, 1001, 33), (64, 130, 1152), (300, 4608, 48), (8, 1152, 1152), (9, 66, 49)]


@needs_vnni
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("symmetric,per_tensor", WEIGHTS, ids=WEIGHT_IDS)
def test_matches_the_exact_torch_path_bit_for_bit(bits, m, k, n, symmetric, per_tensor):
    check(activations(m, k), bits, n, symmetric, per_tensor)


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,k,n", [(33, 1152, 40), (300, 4608, 97), (1, 64, 1152)])
def test_half_precision_inputs_match_the_torch_path(dtype, bits, m, k, n):
    check(activations(m, k, dtype, seed=2), bits, n)


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_nan_inf_and_zero_rows_give_the_torch_paths_outputs(bits, dtype):
    """NaN rows NaN, Inf rows +-Inf (or NaN where the sum is 0), zero rows the bias, the others untouched: at rows on
    both sides of a panel boundary (8) and in a ragged last panel."""
    x = activations(21, 1152).float()
    x[2] = NAN
    x[5, 7] = NAN
    x[7, 100] = INF
    x[8, 3], x[8, 900] = -INF, INF
    x[9] = 0.0
    x[15] = INF
    x[19, 0], x[19, 1] = INF, NAN
    x[20, 11] = 3e38
    check(x.to(dtype), bits, 97)
    check(x.to(dtype), bits, 97, symmetric=True)


@needs_vnni
def test_strided_inputs():
    wide = activations(40, 300)
    check(wide[:, 7:7 + 256], 8, 50)  # rows 300 apart
    check(wide[::3, :256], 4, 50)  # every third row
    check(activations(256, 33).t(), 8, 50)  # column-major: copied
    check(wide.bfloat16()[5:30, 1:250], 8, 50)


@needs_vnni
def test_extreme_codes_over_a_long_k_stay_exact():
    """Activation codes +-127 against weight codes -128 / 127 over K = 4608: int32 sums up to 75e6, where an fp32
    accumulator would round, and zero points at both ends of int8 (the u8 offset added to them)."""
    k, g = 4608, torch.Generator().manual_seed(5)
    codes = torch.where(torch.rand(4, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    zero = torch.tensor([[-128], [127], [0], [5]], dtype=torch.int8)
    scale = torch.full((4, 1), 0.01)
    x = torch.stack([torch.where(codes[0] > 0, 1.0, -1.0), torch.randn(k, generator=g) * 0.01,
                     torch.where(codes[1] > 0, -1.0, 1.0)])
    assert torch.equal(cpu_vnni.linear_vnni(x, codes, 8, scale, zero, None), linear_int(x, codes, scale, zero, None, 8))


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_quantization_gives_the_torch_codes_and_scales(dtype):
    x = activations(19, 101, dtype)
    x[4, 3], x[6, 0] = NAN, INF
    panels, scale, rowsum = cpu_vnni.extension().quantize(x)
    codes = panels.permute(0, 2, 1, 3).reshape(-1, panels.shape[1] * 4)  # [panels, quads, 8, 4] -> rows
    ref_codes, ref_scale = quantize_activation_per_token(x)
    assert_route_matches("cpu_vnni", scale, ref_scale.reshape(-1), "scales")
    clean = ~torch.isnan(ref_scale.reshape(-1))  # a NaN row's codes do not matter: its output is NaN
    assert torch.equal(codes[:19, :101][clean], ref_codes[clean])
    assert not codes[:19, 101:].any() and not codes[19:].any()  # padding: codes 0
    assert torch.equal(rowsum[clean], ref_codes[clean].sum(1, dtype=torch.int32))


@needs_vnni
def test_route_rules(monkeypatch):
    x, vnni = torch.randn(32, 128), route("cpu_vnni")
    for bits in (8, 4):
        for asymmetric in (False, True):
            layer = LayerCall(128, 8, bits, 8, asymmetric=asymmetric)
            assert vnni.applies(layer, x) is None
            assert select_route(layer, x).name == ("cpu_amx" if cpu_amx.available() else "cpu_vnni")
    assert "static activation scale" in vnni.applies(LayerCall(128, 8, 8, 8, static_act_scale=True), x)
    assert vnni.applies(LayerCall(128, 8, 8, 16), x).startswith("A16")
    assert vnni.applies(LayerCall(128, 8, 8, 8, groups=2), x) == "group-wise weights"
    assert vnni.applies(LayerCall(128, 8, 8, 8), x.cuda() if torch.cuda.is_available() else x.to("meta")) \
        == "not a CPU tensor"
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert select_route(LayerCall(128, 8, 8, 8), x).name == "torch"


def test_a_cpu_without_vnni_says_why_and_takes_a_slower_route(monkeypatch):
    """On an AVX2-only CPU (its /proc/cpuinfo flags) the route names what is missing and is never built, so its
    AVX-512 code never runs there."""
    from viditq_diffusers.kernels import cpu_flags

    name, flags = cpu_flags.cpu_model_and_flags()
    monkeypatch.setattr(cpu_vnni, "cpu_model_and_flags", lambda: (name, flags - {"avx512_vnni"}))
    assert not cpu_vnni.cpu_has_vnni() and cpu_vnni.build() is None
    layer, x = LayerCall(128, 8, 8, 8, asymmetric=True), torch.randn(4, 128)
    assert route("cpu_vnni").applies(layer, x) == "no AVX-512 VNNI on this CPU"
    assert select_route(layer, x).name != "cpu_vnni"


@needs_vnni
def test_mismatched_operands_are_refused_with_the_reason():
    ext = cpu_vnni.extension()
    codes, _, scale, zero = random_weights(8, 40, 256)
    x = torch.randn(8, 320)
    with pytest.raises(RuntimeError, match="does not match K = 320 and N = 40"):
        ext.linear(x, ext.pack_weight(codes), 40, zero, scale, None)
    with pytest.raises(RuntimeError, match="w_scale must have 1 or N values, got 3"):
        ext.linear(x, ext.pack_weight(torch.zeros(40, 320, dtype=torch.int8)), 40, None, torch.ones(3), None)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ext.linear(x.double(), ext.pack_weight(codes), 40, zero, scale, None)
