"""A quantized model compiles with `torch.compile(fullgraph=True)`: each ViDiTQLinear is one registered
op (`torch.ops.viditq.linear`) with a fake implementation, so dynamo never breaks the graph."""

import shutil

import pytest
import torch
from torch._inductor.utils import fresh_cache

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.testing.zoo import ZOO, run


def quantized(cls_name, preset, seed=0):
    entry = ZOO[cls_name]
    return quantize(entry.build(seed), ViDiTQConfig(preset=preset)), entry.make_inputs(seed)


@pytest.mark.parametrize("cls_name,preset", [
    ("PixArtTransformer2DModel", "w4a8"),
    ("PixArtTransformer2DModel", "rotate_w8a8"),  # the FWHT runs inside the op
    ("LatteTransformer3DModel", "w8a8"),
    ("FluxTransformer2DModel", "w4a8"),
])
def test_fullgraph_trace_gives_the_eager_output(cls_name, preset):
    model, inputs = quantized(cls_name, preset)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = run(model, inputs)
        compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"), inputs)
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
@pytest.mark.slow
def test_inductor_compiles_a_quantized_model():
    model, inputs = quantized("PixArtTransformer2DModel", "w8a8")
    torch._dynamo.reset()
    with torch.no_grad():
        eager = run(model, inputs)
        compiled = run(torch.compile(model, fullgraph=True), inputs)
    # inductor fuses the float ops around the quantized layers: float rounding differs, the codes do not
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_the_op_checks_its_fake_implementation():
    """torch.library's own consistency check of the fake (meta) kernel against the real one."""
    linear = torch.nn.Linear(64, 24)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4, 8))
    x = torch.randn(5, 64)
    args = (x, layer.qweight, 4, layer.scales(), layer.weight_zero, layer.bias, 8, None, None, None)
    torch.library.opcheck(torch.ops.viditq.linear.default, args, test_utils=("test_schema", "test_faketensor"))
    x.requires_grad_(True)  # the autograd formula is registered the way torch.library wants
    torch.library.opcheck(torch.ops.viditq.linear.default, args, test_utils=("test_autograd_registration",))
    grad_args = (torch.randn(5, 24), layer.qweight, 4, layer.scales(), layer.weight_zero, None, 7, 64)
    torch.library.opcheck(torch.ops.viditq.linear_input_grad.default, grad_args,
                          test_utils=("test_schema", "test_faketensor"))


def float_then_quantized():
    """A float layer (trainable), a ViDiTQLinear whose bias asks for grad (as a loader that makes every Parameter
    trainable leaves it), and a float head: outside no_grad the quantized op gets a backward to trace."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 8, 8))
    layer.bias.requires_grad_(True)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), layer, torch.nn.GELU(), torch.nn.Linear(32, 16))


def test_a_new_layers_bias_is_frozen():
    linear = torch.nn.Linear(64, 32)
    assert not ViDiTQLinear(LayerSpec.for_linear(linear, 8, 8)).bias.requires_grad


def gradients(model, x, forward=None):
    """Output and the gradients of every trainable parameter of `model` after one forward (`forward`: model
    itself, or its compiled form) and backward."""
    model.zero_grad(set_to_none=True)
    y = (forward or model)(x)
    y.square().sum().backward()
    return y, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiles_outside_no_grad_and_backpropagates():
    """Outside `torch.no_grad()` AOT autograd traces the backward: the op's straight-through gradient (one
    registered op with a fake) traces too, and the compiled backward gives eager's gradients bit for bit."""
    model, x = float_then_quantized(), torch.randn(5, 64)
    eager, eager_grads = gradients(model, x)
    torch._dynamo.reset()
    compiled, compiled_grads = gradients(model, x, torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert torch.equal(compiled, eager)
    assert compiled_grads.keys() == eager_grads.keys() and "1.bias" in eager_grads  # the quantized layer's bias
    for name, grad in eager_grads.items():
        assert torch.equal(compiled_grads[name], grad), name


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
@pytest.mark.slow
def test_inductor_compiles_forward_and_backward_outside_no_grad():
    model, x = float_then_quantized(), torch.randn(5, 64)
    eager, eager_grads = gradients(model, x)
    torch._dynamo.reset()
    # a fresh cache: the AOT autograd cache keys a graph by its forward, not by the op's autograd formula, so a
    # backward cached on this machine by an older version of the package would be reused
    with fresh_cache():
        compiled, compiled_grads = gradients(model, x, torch.compile(model, backend="inductor"))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)  # inductor fuses the float layers around it
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_inductor_trains_a_lora_on_a_quantized_transformer(preset):
    """Inductor, outside no_grad, on a quantized tiny PixArt with a LoRA: forward and backward compile, and the
    LoRA factors' gradients are eager's."""
    from peft import LoraConfig, inject_adapter_in_model

    from viditq_diffusers.lora import register_custom_module

    model, inputs = quantized("PixArtTransformer2DModel", preset)
    torch.manual_seed(0)
    inject_adapter_in_model(register_custom_module(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "ff.net.2"],
                                                              init_lora_weights="gaussian")), model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    def step(m):
        model.zero_grad(set_to_none=True)
        run(m, inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in trainable.items()}

    eager = step(model)
    torch._dynamo.reset()
    with fresh_cache():  # as above
        compiled = step(torch.compile(model, backend="inductor"))
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-3, atol=1e-5)
