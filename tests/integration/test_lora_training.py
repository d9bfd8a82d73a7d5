"""LoRA training through quantized layers, with diffusers' recipe: `transformer.add_adapter(LoraConfig(...))`
(Flux: diffusers' PEFT mixin), or PEFT's `inject_adapter_in_model` (PixArt: no mixin); an optimizer over the
LoRA factors; `loss.backward()`; `step()`. The gradients of one step are held against a float64 model whose
quantized layers have the same forward values and the straight-through gradient of their dequantized weight."""

import copy

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

import viditq_diffusers  # noqa: E402
from viditq_diffusers import ViDiTQConfig, ViDiTQLinear  # noqa: E402
from viditq_diffusers.lora import ViDiTQLoraLinear, register_custom_module  # noqa: E402
from viditq_diffusers.testing.zoo import ZOO, run  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_model(cls_name: str, preset: str, seed: int = 0):
    """A quantized zoo model with a rank-4 LoRA on its attention projections, by the class's own route; B drawn
    small (not PEFT's zeros) so that lora_A gets a gradient from the first step."""
    entry = ZOO[cls_name]
    model = viditq_diffusers.quantize(entry.build(seed), ViDiTQConfig(preset=preset))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian")
    torch.manual_seed(seed)
    if hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin: the training scripts' call
        model.add_adapter(config)
    else:
        inject_adapter_in_model(register_custom_module(config), model)
    layers = [m for m in model.modules() if isinstance(m, ViDiTQLoraLinear)]
    assert layers, "no LoRA layer on a quantized linear"
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.normal_(0, 0.02)
    return model, entry.make_inputs(seed)


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def target_for(model, inputs) -> torch.Tensor:
    """What the LoRA learns: the model's own output mirrored left-right (as the reference LoRA does)."""
    with torch.no_grad():
        return run(model, inputs).flip(-1)


class StraightThroughReference(torch.nn.Module):
    """A float64 stand-in for a ViDiTQLinear: the quantized layer's forward values (computed by the layer itself
    in fp32), and the gradient of `x W^T + b`, W the dequantized weight in the original basis (dense R^T)."""

    def __init__(self, layer: ViDiTQLinear):
        super().__init__()
        self._quantized = [layer]  # a list: `.double()` must not cast the real layer
        self.register_buffer("weight64", layer.dequantized_weight(float64=True))
        self.register_buffer("bias64", None if layer.bias is None else layer.bias.detach().double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            value = self._quantized[0](x.float()).double()
        linear = F.linear(x, self.weight64, self.bias64)
        return linear + (value - linear).detach()


def float64_reference(model):
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, ViDiTQLinear):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, StraightThroughReference(module))
    assert not any(isinstance(m, ViDiTQLinear) for m in reference.modules() if m is not None)
    return reference.double()


def float64(value):
    """Floating tensors (also inside dicts, as PixArt's `added_cond_kwargs`) in float64; the rest unchanged."""
    if isinstance(value, dict):
        return {k: float64(v) for k, v in value.items()}
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


CASES = [("FluxTransformer2DModel", "w8a8"), ("FluxTransformer2DModel", "w4a8"),
         ("PixArtTransformer2DModel", "w8a8"), ("PixArtTransformer2DModel", "rotate_w4a8")]


@pytest.mark.parametrize("cls_name,preset", CASES)
def test_training_lowers_the_loss_and_trains_only_the_lora(cls_name, preset):
    model, inputs = lora_model(cls_name, preset)
    quantized_state = {n: b.clone() for n, b in model.named_buffers() if "base_layer" in n}
    params = lora_parameters(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(params)  # PEFT froze the rest
    target = target_for(model, inputs)
    optimizer = torch.optim.AdamW(params.values(), lr=2e-2)
    model.train()
    losses = []
    for _ in range(6):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(run(model, inputs), target)
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params)
    for name, buffer in model.named_buffers():  # the quantized base is untouched: codes, scales, smoothing
        if name in quantized_state:
            assert torch.equal(buffer, quantized_state[name]), name


@pytest.mark.parametrize("cls_name,preset", CASES)
def test_one_steps_lora_gradients_match_the_float64_straight_through_model(cls_name, preset):
    model, inputs = lora_model(cls_name, preset)
    reference = float64_reference(model)
    target = target_for(model, inputs)
    F.mse_loss(run(model, inputs), target).backward()
    inputs64 = {k: float64(v) for k, v in inputs.items()}
    F.mse_loss(run(reference, inputs64), target.double()).backward()
    grads, expected = lora_parameters(model), lora_parameters(reference)
    assert grads.keys() == expected.keys()
    for name, p in grads.items():
        ref = expected[name].grad
        error = ((p.grad.double() - ref).norm() / ref.norm()).item()
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("cls_name,preset", [("FluxTransformer2DModel", "w4a8"), ("PixArtTransformer2DModel",
                                                                                   "rotate_w4a8")])
def test_a_bf16_model_trains_with_the_fp32_models_gradients_to_bf16_precision(cls_name, preset):
    model, inputs = lora_model(cls_name, preset)
    target = target_for(model, inputs)
    F.mse_loss(run(model, inputs), target).backward()
    fp32 = {n: p.grad.clone() for n, p in lora_parameters(model).items()}
    model.zero_grad(set_to_none=True)
    torch.nn.Module.to(model, torch.bfloat16)  # diffusers' own `.to(dtype)` refuses quantized models
    out = run(model, {k: v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in inputs.items()})
    assert out.dtype == torch.bfloat16
    F.mse_loss(out.float(), target).backward()
    for name, p in lora_parameters(model).items():
        assert p.grad.dtype == torch.bfloat16
        error = ((p.grad.double() - fp32[name].double()).norm() / fp32[name].double().norm()).item()
        assert error < 0.15, (name, error)  # bf16 rounding through the whole model: 2-5% measured
