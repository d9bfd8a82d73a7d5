"""The Triton kernels against the torch path: integer outputs bit-exact, float outputs within one unit in
the last place of the output dtype. On a GPU they run compiled; without one, in Triton's CPU interpreter
(tests/conftest.py sets TRITON_INTERPRET=1). Without Triton installed the module is skipped, visibly."""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels are untested here")

from viditq_diffusers import ViDiTQLinear  # noqa: E402
from viditq_diffusers.kernels import linear_triton, quantized_linear, use_triton  # noqa: E402
from viditq_diffusers.kernels.torch_ops import linear_int  # noqa: E402
from viditq_diffusers.kernels.triton_gemm import int_gemm  # noqa: E402
from viditq_diffusers.kernels.triton_quant import quantize_per_token  # noqa: E402
from viditq_diffusers.quant.formats import pack_int4, quantize_activation_per_token, quantize_weight  # noqa: E402

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
    layer = ViDiTQLinear.from_linear(linear, bits, 8, group, smooth_vector=torch.rand(128) + 0.5).to(DEVICE)
    x = torch.randn(40, 128, dtype=torch.bfloat16, device=DEVICE)
    fused = linear_triton(x, layer.qweight, bits, layer.scales(), layer.weight_zero, layer.bias,
                          layer.smooth_factors())
    # the torch path, whatever device: CPU tensors never dispatch to Triton
    torch_path = quantized_linear(x.cpu(), layer.qweight.cpu(), bits, layer.scales().cpu(),
                                  None if layer.weight_zero is None else layer.weight_zero.cpu(), layer.bias.cpu(),
                                  8, smooth=layer.smooth_factors().cpu())
    assert_within_one_ulp(fused.cpu(), torch_path)


def test_dispatch_rules():
    x = torch.randn(32, 128)
    per_channel = torch.ones(8, 1)
    assert not use_triton(x, 8, None, per_channel)  # CPU tensors take the torch path
    if torch.cuda.is_available():
        xc = x.cuda()
        assert use_triton(xc, 8, None, per_channel)
        assert not use_triton(xc[:16], 8, None, per_channel)            # adaLN-sized: torch path
        assert not use_triton(xc, 8, torch.tensor(1.0), per_channel)    # static scale (naive baseline)
        assert not use_triton(xc, 16, None, per_channel)                # A16
        assert not use_triton(xc, 8, None, torch.ones(8, 4))            # group 32: smaller than BLOCK_K


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares dispatch on a real GPU")
def test_layer_forward_on_cuda_uses_triton_and_matches_torch_path(monkeypatch):
    torch.manual_seed(0)
    layer = ViDiTQLinear.from_linear(torch.nn.Linear(256, 96).to(torch.bfloat16), 4, 8).cuda()
    x = torch.randn(2, 50, 256, dtype=torch.bfloat16, device="cuda")
    fused = layer(x)
    monkeypatch.setenv("VIDITQ_KERNELS", "torch")
    assert_within_one_ulp(fused, layer(x))
