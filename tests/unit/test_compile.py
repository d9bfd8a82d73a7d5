"""A quantized model compiles with `torch.compile(fullgraph=True)`: each ViDiTQLinear is one registered
op (`torch.ops.viditq.linear`) with a fake implementation, so dynamo never breaks the graph."""

import shutil

import pytest
import torch

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


def frozen_stack():
    """A float layer (trainable: its output requires grad outside no_grad), a ViDiTQLinear whose bias asks for
    grad (as a loader that makes every Parameter trainable leaves it), and a float head."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 8, 8))
    layer.bias.requires_grad_(True)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), layer, torch.nn.GELU(), torch.nn.Linear(32, 16))


def test_a_new_layers_bias_is_frozen():
    linear = torch.nn.Linear(64, 32)
    assert not ViDiTQLinear(LayerSpec.for_linear(linear, 8, 8)).bias.requires_grad


def test_compiles_for_inference_outside_no_grad_and_says_there_is_no_backward():
    """Outside `torch.no_grad()` AOT autograd traces a backward; it used to fail on the op's missing autograd
    formula. Now it compiles, gives the eager output, and a backward raises our message (eager too)."""
    model, x = frozen_stack(), torch.randn(5, 64)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
    for y in (eager, compiled):
        with pytest.raises(RuntimeError, match="ViDiTQLinear has no backward pass yet.*torch.no_grad"):
            y.sum().backward()


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on CPU needs a C++ compiler")
@pytest.mark.slow
def test_inductor_compiles_outside_no_grad():
    model, x = frozen_stack(), torch.randn(5, 64)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)  # inductor fuses the float layers around it
