"""Backward through `torch.ops.viditq.linear`: the straight-through gradient w.r.t. the input, against a float64
reference built from other code (autograd through `balance_activation` in float64 and the dequantized codes),
for every weight format, with and without smoothing and rotation, in fp32, bf16 and fp16."""

import pytest
import torch

from viditq_diffusers import ViDiTQLinear
from viditq_diffusers.kernels.ops import linear_input_grad
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.quant.channel_balance import balance_activation
from viditq_diffusers.quant.formats import dequantize_weight, unpack_int4
from viditq_diffusers.quant.hadamard import rotate, rotate_transpose, rotation_matrix
from viditq_diffusers.timestep_clock import TimestepClock

# name -> (weight_bits, act_bits, group_size, symmetric, per-tensor, static act_scale)
FORMATS = {
    "W8A8": (8, 8, None, False, False, None),
    "W8A8-sym": (8, 8, None, True, False, None),
    "W4A8": (4, 8, None, False, False, None),
    "W4A8-g16-sym": (4, 8, 16, True, False, None),
    "W8A8-g32": (8, 8, 32, False, False, None),
    "W4A16-g16": (4, 16, 16, False, False, None),
    "W8A8-tensor-static": (8, 8, None, True, True, 0.05),
}
BALANCE = {"plain": (False, None), "smooth": (True, None), "rotate": (False, 7), "smooth+rotate": (True, 7)}
WIDTHS = (64, 96)  # 96 = 12 * 8: the rotation has a dense Paley factor
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_layer(fmt, balance, width, bias=True, out_features=40, seed=0, **extra):
    weight_bits, act_bits, group, symmetric, per_tensor, act_scale = FORMATS[fmt]
    smoothed, seed_r = BALANCE[balance]
    torch.manual_seed(seed)
    linear = torch.nn.Linear(width, out_features, bias=bias)
    spec = LayerSpec.for_linear(linear, weight_bits, act_bits, group, symmetric, weight_per_tensor=per_tensor,
                                act_scale=act_scale, smooth_alpha=0.5 if smoothed else None, rotation_seed=seed_r,
                                **extra)
    smoothing = torch.rand(width) * 3 + 0.2 if smoothed else None
    return ViDiTQLinear.from_linear(linear, spec, smoothing)


def ste_reference(layer: ViDiTQLinear, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """dL/dx of the float64 layer the codes stand for, `balance(x) Wq^T + b` (activation rounding = identity),
    by autograd: smoothing and rotation through `balance_activation`'s own float64 ops."""
    qweight, bits, scale, zero = layer.active_weight()
    codes = unpack_int4(qweight, layer.in_features) if bits == 4 else qweight
    weight = dequantize_weight(codes, scale, zero).double()
    x64 = x.detach().double().requires_grad_(True)
    smooth = None if layer.smoothing() is None else layer.smoothing().double()
    y = balance_activation(x64, smooth, layer.rotation_seed) @ weight.T
    y.backward(grad_y.double())
    return x64.grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n", [64, 96, 12, 20, 1152])  # powers of two, Paley I and II orders, 36 * 32
def test_rotate_transpose_is_the_dense_transpose_and_undoes_rotate(n):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(rotate_transpose(x, 5), x @ rotation_matrix(n, 5).T, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate_transpose(rotate(x, 5), 5), x, rtol=0, atol=1e-12)
    # 1/sqrt(n) first: float16 stays in range where the unnormalised transform (x sqrt(n)) would overflow
    big = (x * 20000 / x.abs().max()).half()
    torch.testing.assert_close(rotate_transpose(big, 5).double(), rotate_transpose(big.double(), 5), rtol=0.01, atol=20)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("balance", BALANCE)
@pytest.mark.parametrize("fmt", FORMATS)
def test_input_grad_is_the_float64_straight_through_gradient(fmt, balance, width):
    layer = make_layer(fmt, balance, width)
    x = (torch.randn(2, 5, width) * torch.linspace(0.1, 4, width)).requires_grad_(True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    ref = ste_reference(layer, x.reshape(-1, width), grad_y.reshape(-1, layer.out_features))
    assert relative_error(x.grad.reshape(-1, width), ref) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,balance,width", [("W8A8", "smooth+rotate", 96), ("W4A8-g16-sym", "rotate", 64),
                                               ("W4A8", "smooth", 64)])
def test_input_grad_in_the_inputs_dtype(fmt, balance, width, dtype):
    layer = make_layer(fmt, balance, width).to(dtype)
    x = torch.randn(7, width, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert x.grad.dtype == dtype
    assert relative_error(x.grad, ste_reference(layer, x, grad_y)) < TOLERANCE[dtype]


def test_the_original_basis_weight_gives_the_same_gradient():
    """dL/dx = dL/dy Wq R^T diag(m) = dL/dy W, W the layer's weight with the balancing undone (dense R^T)."""
    layer = make_layer("W8A8", "smooth+rotate", 96)
    x = torch.randn(6, 96, requires_grad=True)
    grad_y = torch.randn(6, layer.out_features)
    layer(x).backward(grad_y)
    ref = grad_y.double() @ layer.dequantized_weight(float64=True)
    assert relative_error(x.grad, ref) < 1e-6


@pytest.mark.parametrize("fmt,balance,width", [("W8A8", "smooth+rotate", 96), ("W4A8-g16-sym", "rotate", 64),
                                               ("W4A8", "plain", 64)])
def test_gradcheck_of_the_formula_against_the_straight_through_forward(fmt, balance, width):
    """torch.autograd.gradcheck: the registered backward op, in float64, against the numerical Jacobian of the
    float64 straight-through forward `balance(x) Wq^T`."""
    layer = make_layer(fmt, balance, width, out_features=12)
    qweight, bits, scale, zero = layer.active_weight()
    codes = unpack_int4(qweight, width) if bits == 4 else qweight
    weight = dequantize_weight(codes, scale, zero).double()
    smooth = None if layer.smoothing() is None else layer.smoothing().double()

    class StraightThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return balance_activation(x, smooth, layer.rotation_seed) @ weight.T

        @staticmethod
        def backward(ctx, grad):
            return linear_input_grad(grad, qweight, bits, scale, zero, layer.smoothing(), layer.rotation_seed, width)

    x = torch.randn(3, width, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(StraightThrough.apply, (x,), eps=1e-6, atol=1e-7)


def test_the_timestep_wise_early_copy_gets_its_own_gradient():
    layer = make_layer("W4A8", "rotate", 64, early_weight_bits=8, early_timestep=500.0)
    layer.clock = TimestepClock()
    x = torch.randn(4, 64, requires_grad=True)
    grad_y = torch.randn(4, layer.out_features)
    grads = {}
    for t in (900.0, 100.0):  # early copy (W8), then the main one (W4)
        layer.clock.timestep = t
        x.grad = None
        layer(x).backward(grad_y)
        assert relative_error(x.grad, ste_reference(layer, x, grad_y)) < 1e-6
        grads[t] = x.grad
    assert relative_error(grads[900.0], grads[100.0]) > 1e-3  # two different weights, two gradients


def test_the_bias_gets_its_gradient_and_the_scales_refuse_one():
    layer = make_layer("W8A8", "smooth", 64)
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 64, requires_grad=True)
    grad_y = torch.randn(5, layer.out_features)
    layer(x).backward(grad_y)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(0))

    qweight, bits, scale, zero = layer.active_weight()
    for name in ("scale", "smooth"):
        args = dict(scale=scale.clone(), smooth=layer.smoothing().clone())
        args[name].requires_grad_(True)
        y = torch.ops.viditq.linear(x, qweight, bits, args["scale"], zero, layer.bias, 8, None, args["smooth"], None)
        with pytest.raises(RuntimeError, match=f"quantized weight is frozen.*\\({name} require grad here\\).*LoRA"):
            y.sum().backward()


def test_backprop_reaches_a_float_layer_before_a_quantized_one():
    torch.manual_seed(1)
    first = torch.nn.Linear(48, 96)
    quantized = make_layer("W4A8-g16-sym", "smooth+rotate", 96, out_features=32)
    model = torch.nn.Sequential(first, torch.nn.GELU(), quantized)
    x, target = torch.randn(8, 48), torch.randn(8, 32)
    (model(x) * target).sum().backward()  # dL/dy = target whatever y is: the float64 reference is exact

    w64, b64 = first.weight.detach().double().requires_grad_(True), first.bias.detach().double()
    hidden = torch.nn.functional.gelu(x.double() @ w64.T + b64)
    ((hidden @ quantized.dequantized_weight(float64=True).T) * target.double()).sum().backward()
    assert first.weight.grad is not None and relative_error(first.weight.grad, w64.grad) < 1e-5
    assert quantized.bias.grad is None  # the quantized layer stays frozen
