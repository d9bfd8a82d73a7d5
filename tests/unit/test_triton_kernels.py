"""The Triton kernels against the torch path: integer outputs bit-exact, float outputs within one unit in
the last place of the output dtype. On a GPU they run compiled; without one, in Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1). Without Triton installed the module is skipped, visibly."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels are untested here")

from viditq_diffusers import ViDiTQLinear  # noqa: E402
from viditq_diffusers.kernels import LayerCall, linear_triton, quantized_linear, route  # noqa: E402
from viditq_diffusers.kernels.torch_ops import linear_int  # noqa: E402
from viditq_diffusers.layer_spec import LayerSpec  # noqa: E402
from viditq_diffusers.kernels.triton_gemm import int_gemm  # noqa: E402
from viditq_diffusers.kernels import triton_quant  # noqa: E402
from viditq_diffusers.kernels.triton_quant import quantize_per_token  # noqa: E402
from viditq_diffusers.quant.channel_balance import balance_activation_kernel_order  # noqa: E402
from viditq_diffusers.quant.formats import (  # noqa: E402
    pack_int4, quantize_activation_per_token, quantize_weight, unpack_int4,
)
from viditq_diffusers.quant.hadamard import rotate_kernel_order  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.double(), expected.double()
    ulp = (torch.nextafter(expected.abs(), torch.tensor(float("inf"), dtype=expected.dtype,
                                                       device=expected.device)) - expected.abs()).double()
    bad = (a - e).abs() > ulp
    assert not bad.any(), f"{int(bad.sum())} outputs off by more than one ulp, max error {(a - e).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 70), (5, 1152)])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_per_token_is_bit_exact(dtype, shape, smooth):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    m = (torch.rand(shape[1], generator=g) + 0.5) if smooth else None
    x, m = x.to(DEVICE), None if m is None else m.to(DEVICE)
    codes, scale, rowsum = quantize_per_token(x, 8, m)
    ref_codes, ref_scale = quantize_activation_per_token(x if m is None else x * m.to(dtype))
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    assert torch.equal(rowsum, ref_codes.sum(1, dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [64, 96, 1152])  # p = 1 (FWHT only), 12 x 8, 36 x 32 (dense factor + FWHT)
@pytest.mark.parametrize("smooth", [False, True])
def test_rotated_quantize_per_token_is_bit_exact(dtype, k, smooth):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(9, k, generator=g) * 3).to(dtype)
    x[4, 5] = 60.0  # an outlier channel: what the rotation spreads
    m = (torch.rand(k, generator=g) + 0.5) if smooth else None
    x, m = x.to(DEVICE), None if m is None else m.to(DEVICE)
    codes, scale, rowsum = quantize_per_token(x, 8, m, rotation_seed=5)
    ref_codes, ref_scale = quantize_activation_per_token(rotate_kernel_order(x if m is None else x * m.to(dtype), 5))
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    assert torch.equal(rowsum, ref_codes.sum(1, dtype=torch.int32))


def test_rotation_beyond_the_tile_limit_runs_in_torch_first(monkeypatch):
    monkeypatch.setattr(triton_quant, "MAX_ROTATED_TILE", 32)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    m = (torch.rand(96, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEVICE)
    codes, scale, _ = quantize_per_token(x, 8, m, rotation_seed=1)
    ref_codes, ref_scale = quantize_activation_per_token(balance_activation_kernel_order(x, m, 1))
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_quantize_per_token_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -3.5, 126.5]], device=DEVICE)  # scale 1: every .5 is a tie
    codes, scale, _ = quantize_per_token(x)
    assert scale.item() == 1.0
    assert codes.tolist() == [[127, 0, 2, 2, 0, -4, 126]]


def test_quantize_per_token_zero_row_gives_zero_scale_and_codes():
    x = torch.zeros(3, 40, device=DEVICE)
    x[1] = 1.0
    codes, scale, rowsum = quantize_per_token(x)
    assert scale[0].item() == 0 and not codes[0].any() and rowsum[0].item() == 0
    assert torch.isfinite(scale).all()


CASES = [  # (weight bits, group size, symmetric, K)
    (8, None, False, 64), (8, None, True, 70), (8, None, False, 63),
    (4, None, False, 64), (4, None, True, 70), (4, None, False, 63),
    (8, 64, False, 128), (4, 64, False, 128), (4, 64, True, 192),
]


@pytest.mark.parametrize("bits,group,symmetric,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_gemm_matches_torch_path(bits, group, symmetric, k, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    x = torch.randn(37, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(45, k, generator=g)
    bias = torch.randn(45, generator=g).to(dtype).to(DEVICE)
    codes, scale, zero = (t if t is None else t.to(DEVICE) for t in quantize_weight(w, bits, group, symmetric))
    qweight = pack_int4(codes) if bits == 4 else codes
    xq, x_scale, rowsum = quantize_per_token(x)
    y = int_gemm(xq, x_scale, rowsum, qweight, bits, scale, zero, bias, dtype)
    assert_within_one_ulp(y, linear_int(x, codes, scale, zero, bias, 8))


def test_int_gemm_per_tensor_weight_scale_and_no_bias():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(20, 64, generator=g).to(DEVICE), torch.randn(33, 64, generator=g)
    codes, scale, zero = (t.to(DEVICE) for t in quantize_weight(w, 8, per_tensor=True))
    xq, x_scale, rowsum = quantize_per_token(x)
    y = int_gemm(xq, x_scale, rowsum, codes, 8, scale, zero, None, torch.float32)
    assert_within_one_ulp(y, linear_int(x, codes, scale, zero, None, 8))


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 64)])
def test_smoothed_layer_fused_path_matches_torch_path(bits, group):
    """A smoothed ViDiTQLinear: the fused kernels (smoothing inside the quantization kernel) give the layer's
    torch-path output."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48).to(torch.bfloat16)
    spec = LayerSpec.for_linear(linear, bits, 8, group, smooth_alpha=0.5)
    layer = ViDiTQLinear.from_linear(linear, spec, torch.rand(128) + 0.5).to(DEVICE)
    x = torch.randn(40, 128, dtype=torch.bfloat16, device=DEVICE)
    fused = linear_triton(x, layer.qweight, bits, layer.scales(), layer.weight_zero, layer.bias,
                          layer.smoothing())
    # the torch path, whatever device: CPU tensors never dispatch to Triton
    torch_path = quantized_linear(x.cpu(), layer.qweight.cpu(), bits, layer.scales().cpu(),
                                  None if layer.weight_zero is None else layer.weight_zero.cpu(), layer.bias.cpu(),
                                  8, smooth=layer.smoothing().cpu())
    assert_within_one_ulp(fused.cpu(), torch_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_rotated_layer_fused_path_matches_torch_path(bits):
    """A smoothed and rotated ViDiTQLinear: the fused path (balancing inside the quantization kernel) gives
    the torch path's output on the kernel-order rotation to one ulp, and the layer's torch path to float noise."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 48).to(torch.bfloat16)  # 192 = 12 x 16: dense factor and FWHT
    spec = LayerSpec.for_linear(linear, bits, 8, smooth_alpha=0.5, rotation_seed=3)
    layer = ViDiTQLinear.from_linear(linear, spec, torch.rand(192) + 0.5).to(DEVICE)
    x = torch.randn(40, 192, dtype=torch.bfloat16, device=DEVICE)
    x[:, 7] *= 30
    codes = layer.qweight if bits == 8 else unpack_int4(layer.qweight, 192)
    fused = linear_triton(x, layer.qweight, bits, layer.scales(), layer.weight_zero, layer.bias,
                          layer.smoothing(), layer.rotation_seed)
    kernel_order = rotate_kernel_order(x * layer.smoothing().to(x.dtype), 3)
    assert_within_one_ulp(fused, linear_int(kernel_order, codes, layer.scales(), layer.weight_zero, layer.bias, 8))
    torch_path = quantized_linear(x.cpu(), layer.qweight.cpu(), bits, layer.scales().cpu(),
                                  None if layer.weight_zero is None else layer.weight_zero.cpu(), layer.bias.cpu(),
                                  8, smooth=layer.smoothing().cpu(), rotation_seed=3)
    error = (fused.cpu().float() - torch_path.float()).abs().max() / torch_path.float().abs().max()
    assert error < 0.02, f"fused vs torch path relative error {error:.4f}"


def test_dispatch_rules():
    x, triton = torch.randn(32, 128), route("triton")
    w4 = LayerCall(128, 8, 4, 8, asymmetric=True)
    assert triton.applies(w4, x) == "not a CUDA tensor"
    if torch.cuda.is_available():
        xc = x.cuda()
        assert triton.applies(w4, xc) is None
        assert "launch-bound" in triton.applies(w4, xc[:16])                              # adaLN-sized: torch
        assert "static activation scale" in triton.applies(LayerCall(128, 8, 4, 8, static_act_scale=True), xc)
        assert triton.applies(LayerCall(128, 8, 4, 16), xc).startswith("A16")
        assert "multiple of 64" in triton.applies(LayerCall(128, 8, 4, 8, groups=4), xc)  # g32 < BLOCK_K
        assert triton.applies(LayerCall(128, 8, 4, 8, groups=2), xc) is None               # g64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares dispatch on a real GPU")
def test_layer_forward_on_cuda_uses_triton_and_matches_torch_path(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(torch.bfloat16)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4, 8)).cuda()
    x = torch.randn(2, 50, 256, dtype=torch.bfloat16, device="cuda")
    fused = layer(x)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert_within_one_ulp(fused, layer(x))
