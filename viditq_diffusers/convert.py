"""Model surgery: swap `nn.Linear` for `ViDiTQLinear` following a plan.

The diffusers quantizer (`from_pretrained(..., quantization_config=...)`) and `api.quantize` (an
already-loaded model) both build their layers with these functions.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .balancing import finalize_layer
from .nn import ViDiTQLinear
from .plan import build_plan, validate_plan


def layout(spec: dict) -> dict:
    """`ViDiTQLinear` quantization fields of a plan entry (optional fields take their defaults)."""
    return dict(
        weight_bits=spec["weight_bits"], act_bits=spec["act_bits"], group_size=spec["group_size"],
        symmetric=spec["symmetric"], weight_per_tensor=spec.get("weight_per_tensor", False),
        act_scale=spec.get("act_scale"), rotation_seed=spec.get("rotation_seed"),
        early_weight_bits=spec.get("early_weight_bits"), early_timestep=spec.get("early_timestep"),
    )


def layer_from_spec(spec: dict, device=None, dtype=None) -> ViDiTQLinear:
    """An empty `ViDiTQLinear` with the layout `spec` describes (e.g. on the meta device)."""
    return ViDiTQLinear(spec["in_features"], spec["out_features"], spec["bias"], device=device, dtype=dtype,
                        smooth=spec.get("smooth_alpha") is not None, **layout(spec))


@torch.no_grad()
def quantized_layer(name: str, weight: torch.Tensor, bias: torch.Tensor | None, spec: dict, config) -> ViDiTQLinear:
    """The `ViDiTQLinear` for one FP weight: balancing decided (the plan entry is completed in place), the
    weight quantized once. `bias` may still be on the meta device (the loader fills it later)."""
    smooth = finalize_layer(name, weight, spec, config)
    layer = layer_from_spec(spec, device=weight.device, dtype=weight.dtype)
    layer.set_weight(weight, name, smooth)
    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return layer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_not_quantized(model: nn.Module) -> None:
    if getattr(model, "is_quantized", False) or any(isinstance(m, ViDiTQLinear) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already quantized; quantizing twice would re-round integer weights. "
            f"Load the floating-point model again and quantize that."
        )


def resolve_plan(model: nn.Module, config) -> dict:
    """The config's explicit plan (validated against the model), or the default plan. A statistics path in
    `config.calibration` is loaded here (in place) and checked against the model."""
    from .calibration import CalibrationStats

    if isinstance(config.calibration, str):
        config.calibration = CalibrationStats.load(config.calibration)
    if isinstance(config.calibration, CalibrationStats):
        config.calibration.check_matches(model)
    if config.plan is not None:
        validate_plan(model, config.plan)
        return config.plan
    return build_plan(model, config)


@torch.no_grad()
def own_aligned_memory(model: nn.Module) -> None:
    """Copy CPU tensors that are not 64-byte aligned (e.g. mmap'ed from safetensors) into fresh memory.

    CPU BLAS picks kernels by pointer alignment, so the same weights at another address can round
    differently; without this a reloaded model is not bit-identical to the one that was saved.
    """
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.clone()
                    else:
                        store[name] = tensor.clone()


def quantized_layers(model: nn.Module, config):
    """`(plan, iterator of (name, ViDiTQLinear))` for any `nn.Module`, which stays untouched.

    The layers are built one at a time as the iterator is consumed (the caller swaps each in, or keeps
    them aside, e.g. as ComfyUI object patches), so memory holds one extra layer at a time. `config` is
    completed in place (statistics loaded, plan entries finished): pass a copy.
    """
    check_not_quantized(model)
    plan = resolve_plan(model, config)

    def build():
        with torch.no_grad():
            for name, spec in tqdm(plan["layers"].items(), desc="Quantizing", unit="layer", disable=None):
                linear = model.get_submodule(name)
                bias = None if linear.bias is None else linear.bias.detach().clone()
                yield name, quantized_layer(name, linear.weight.detach(), bias, spec, config)

    return plan, build()
