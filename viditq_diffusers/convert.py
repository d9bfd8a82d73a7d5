"""Model surgery: swap `nn.Linear` for `ViDiTQLinear` following a plan.

The diffusers quantizer (`from_pretrained(..., quantization_config=...)`) and `api.quantize` (an
already-loaded model) both build their layers with these functions.
"""

from __future__ import annotations

import warnings
from dataclasses import fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .layer_spec import LayerSpec
from .nn import ViDiTQLinear
from .plan import PLAN_VERSION, build_plan, plan_from_json, validate_plan
from .recipe import decide_layer


@torch.no_grad()
def quantized_layer(name: str, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec,
                    config) -> ViDiTQLinear:
    """The `ViDiTQLinear` for one FP weight: balancing decided (`layer.spec` is the decided plan entry, for the
    caller to put in the plan), the weight quantized once. `bias` may still be on the meta device (the loader
    fills it later)."""
    spec, smoothing = decide_layer(name, weight, spec, config)
    layer = ViDiTQLinear(spec, device=weight.device, dtype=weight.dtype)
    layer.set_weight(weight, name, smoothing)
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
        if config.modules_to_not_convert:
            warnings.warn(f"modules_to_not_convert={config.modules_to_not_convert} is not used: the explicit plan "
                          f"decides every layer (layers absent from it stay in floating point). Remove those "
                          f"layers from the plan instead.", stacklevel=3)
        validate_plan(model, config.plan)
        return plan_from_json(config.plan)
    return build_plan(model, config)


@torch.no_grad()
def freeze_quantized_layers(model: nn.Module) -> None:
    """Every `ViDiTQLinear`'s own tensors stop requiring grad: the loaders (diffusers', transformers') wrap the
    float tensors they set as trainable, and a quantized layer's bias is frozen as `quantize()` and a reload leave
    it (adapters train beside the layer)."""
    for layer in model.modules():
        if isinstance(layer, ViDiTQLinear):
            for tensor in layer.parameters(recurse=False):
                tensor.requires_grad_(False)


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
    completed in place (statistics loaded, plan entries decided as the layers are built): pass a copy.
    """
    check_not_quantized(model)
    plan = resolve_plan(model, config)

    def build():
        with torch.no_grad():
            for name, spec in tqdm(list(plan["layers"].items()), desc="Quantizing", unit="layer", disable=None):
                linear = model.get_submodule(name)
                bias = None if linear.bias is None else linear.bias.detach().clone()
                layer = quantized_layer(name, linear.weight.detach(), bias, spec, config)
                plan["layers"][name] = layer.spec  # decided
                yield name, layer

    return plan, build()


# safetensors dtype names of the integer buffers a ViDiTQLinear stores
SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}
QUANTIZED_LEAVES = ("qweight", "weight_scale", "weight_zero", "act_smooth", "early_qweight", "early_weight_scale",
                    "early_weight_zero")


def stored_tensor_problems(plan: dict, headers: dict[str, tuple[str, list[int]]]) -> list[str]:
    """What does not fit between a plan and a checkpoint's integer tensors (`{name: (safetensors dtype, shape)}`,
    `checkpoint.tensor_headers`): per planned layer, each tensor its `ViDiTQLinear` stores must be there with its
    shape and dtype, and no other quantized tensor. Bits, group size, symmetry, per-tensor scales, smoothing and
    the timestep-wise copy all show in these tensors; a plan edited by hand would otherwise load other numbers."""
    problems = []
    for name, spec in plan_from_json(plan)["layers"].items():
        layer = ViDiTQLinear(spec, device="meta")
        expected = {leaf: (SAFETENSORS_DTYPES[t.dtype], list(t.shape)) for leaf, t in layer.state_dict().items()
                    if t.dtype in SAFETENSORS_DTYPES}
        stored = {leaf: headers[f"{name}.{leaf}"] for leaf in QUANTIZED_LEAVES if f"{name}.{leaf}" in headers}
        for leaf in sorted(set(expected) | set(stored)):
            if leaf not in stored:
                problems.append(f"{name}: the plan ({spec.label()}, symmetric={spec.symmetric}, smoothed="
                                f"{spec.smoothed}) needs a '{leaf}' tensor, the checkpoint has none")
            elif leaf not in expected:
                problems.append(f"{name}: the checkpoint has a '{leaf}' tensor that the plan ({spec.label()}, "
                                f"symmetric={spec.symmetric}, smoothed={spec.smoothed}) does not use")
            elif (stored[leaf][0], list(stored[leaf][1])) != expected[leaf]:
                problems.append(f"{name}.{leaf}: the plan ({spec.label()}) needs {expected[leaf][0]} "
                                f"{expected[leaf][1]}, the checkpoint has {stored[leaf][0]} {list(stored[leaf][1])}")
    return problems


def recorded_plan_problems(plan: dict, recorded_layers: dict) -> list[str]:
    """What differs between a plan and the plan entries a checkpoint's weights were saved with (the safetensors
    metadata `viditq_plan`): the fields no tensor shows (rotation seed, static activation scale, smoothing
    exponent, timestep-wise switch) would otherwise load silently changed."""
    recorded = plan_from_json({"version": PLAN_VERSION, "layers": recorded_layers})["layers"]
    problems = []
    for name, spec in plan_from_json(plan)["layers"].items():
        saved = recorded.get(name)
        if saved is None or saved == spec:
            continue
        changed = [f.name for f in fields(spec) if f.compare and getattr(spec, f.name) != getattr(saved, f.name)]
        problems.append(f"{name}: " + ", ".join(f"{f}={getattr(spec, f)!r} (saved with {getattr(saved, f)!r})"
                                               for f in changed))
    return problems
