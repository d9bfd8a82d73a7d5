"""ViDiTQLinear: real integer matmul, matches its float reference, handles dtypes and shapes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels import LayerCall, select_route
from viditq_diffusers.layer_spec import LayerSpec


class CountOps(TorchDispatchMode):
    """Records which aten ops ran (a real dispatch-level trace, not a mock)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def make(weight_bits, act_bits, group_size=None, symmetric=False, bias=True, in_f=64, out_f=48):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    spec = LayerSpec.for_linear(linear, weight_bits, act_bits, group_size, symmetric)
    return linear, ViDiTQLinear.from_linear(linear, spec)


@pytest.mark.parametrize("weight_bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_integer_path_matches_float_reference(weight_bits, group_size, symmetric):
    _, layer = make(weight_bits, 8, group_size, symmetric)
    x = torch.randn(3, 10, 64) * torch.linspace(0.1, 5, 64)
    with CountOps() as trace:
        y = layer(x)
    # the CPU integer GEMM is the exact fp32 route (tests/unit/test_int_mm.py), never F.linear on float weights
    assert "aten.addmm" not in trace.ops and "aten.linear" not in trace.ops
    ref = layer.reference_forward(x)
    assert y.shape == (3, 10, 48) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_activations_are_really_quantized():
    linear, layer = make(8, 8)
    x = torch.randn(64, 64)
    weight_only = torch.nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    y = layer(x)
    # the W8A8 output differs from the weight-only output by the activation rounding error
    assert (y - weight_only).abs().max() > 1e-3
    assert ((y - linear(x)).norm() / linear(x).norm()) < 0.02


def test_weight_only_dequantizes_in_activation_dtype():
    _, layer = make(4, 16, group_size=16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with CountOps() as trace:
        y = layer(x)
    assert "aten._int_mm" not in trace.ops and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), layer.reference_forward(x), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    _, layer = make(8, 8)
    x = torch.randn(4, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), layer.reference_forward(x), rtol=1e-2, atol=1e-2)


def test_zero_rows_and_no_bias():
    _, layer = make(8, 8, bias=False)
    x = torch.zeros(3, 64)
    assert torch.equal(layer(x), torch.zeros(3, 48))


def test_memory_layout():
    _, w8 = make(8, 8)
    _, w4 = make(4, 8, group_size=16, in_f=63 + 1)
    assert w8.qweight.dtype == torch.int8 and w8.qweight.shape == (48, 64)
    assert w4.qweight.dtype == torch.uint8 and w4.qweight.shape == (48, 32)
    assert w4.scales().dtype == torch.float32 and w4.scales().shape == (48, 4)
    assert w4.weight_zero.dtype == torch.int8
    # int codes never sit under a float weight's name: `weight` is an empty dtype marker
    assert w8.state_dict()["weight"].numel() == 0 and w8.weight.dtype == torch.float32


def test_cast_keeps_scales_exact():
    _, layer = make(8, 8)
    scales = layer.scales().clone()
    layer.to(torch.float16)
    assert torch.equal(layer.scales(), scales) and layer.bias.dtype == torch.float16
    x = torch.randn(4, 64, dtype=torch.float16)
    torch.testing.assert_close(layer(x).double(), layer.reference_forward(x), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(1, 64, 48), (16, 64, 48), (33, 63, 45), (300, 256, 512)])
@pytest.mark.parametrize("weight_bits,group_size", [(8, None), (4, None), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_integer_path(shape, weight_bits, group_size, dtype):
    """CUDA: the Triton path for M > 16 and groups of 64+, else `_int_mm` (needs K, N multiples of 8: odd shapes
    are padded); results stay exact."""
    m, k, n = shape
    if group_size and k % group_size:
        pytest.skip("group does not divide K")
    _, layer = make(weight_bits, 8, group_size, in_f=k, out_f=n)
    x = torch.randn(m, k) * torch.linspace(0.1, 5, k)
    cpu = layer(x)
    layer.cuda().to(dtype)
    with CountOps() as trace:
        y = layer(x.cuda().to(dtype))
    assert y.dtype == dtype and y.is_cuda
    xc, scale = x.cuda(), layer.scales()
    call = LayerCall.of_op(xc, layer.qweight, weight_bits, scale, layer.weight_zero, 8, None, None, None)
    if select_route(call, xc).name == "triton":  # the fused Triton path (tests/unit/test_triton_kernels.py)
        assert "aten._int_mm" not in trace.ops
    else:
        assert "aten._int_mm" in trace.ops
    ref = layer.reference_forward(x.cuda().to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(y.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("act_bits", [8, 16])
def test_a_non_float_input_is_refused_like_nn_linear(dtype, act_bits):
    """nn.Linear raises on an integer input; the quantized layer used to accept it and return int64."""
    linear, layer = make(8, act_bits)
    x = torch.ones(2, 64).to(dtype)
    with pytest.raises(RuntimeError):
        linear(x)
    for forward in (layer, layer.reference_forward):
        with pytest.raises(TypeError, match=f"expects a floating-point input .*got {dtype}; cast it first"):
            forward(x)


def test_a_cast_of_the_bit_pattern_tensors_is_refused_not_read_as_numbers():
    """Scales and smoothing factors are fp32 values stored as int32 bit patterns; a recipe that casts every 1-D
    parameter to float (diffusers' generic training check does) turns them into other numbers: the layer refuses
    to run instead of computing with them."""
    linear = torch.nn.Linear(32, 16)
    spec = LayerSpec.for_linear(linear, 8, 8, smooth_alpha=0.5)
    layer = ViDiTQLinear.from_linear(linear, spec, torch.rand(32) + 0.5)
    x = torch.randn(4, 32)
    layer(x)
    for param in layer.parameters():
        if param.ndim == 1:
            param.data = param.data.float()
    with pytest.raises(ValueError, match=r"act_smooth is torch.float32.*is_floating_point"):
        layer(x)
