"""`fuse_qkv_projections()` on a quantized model: one `ViDiTQLinear` for q, k and v, built from their codes.

diffusers' models fuse by calling each attention module's `fuse_projections`, which concatenates the float
weights of `to_q` / `to_k` / `to_v` (`to_k` / `to_v` for cross-attention, and `add_q_proj` / `add_k_proj` /
`add_v_proj` for joint attention) into a new `nn.Linear` (`to_qkv`, `to_kv`, `to_added_qkv`) and keeps the three
layers; its processors then run the fused layer. A `ViDiTQLinear` has no float weight, so `install` gives each
attention module with quantized projections its own `fuse_projections` that concatenates the layers' integer codes,
weight scales, zero points and biases along the output channels instead.

Why that is exact: every output channel of a quantized linear depends only on its own weight row and scales and on
the input row's activation quantization, which is per token (or one static scale) and shared by all output
channels; the integer GEMM is exact, and each output is scaled and biased on its own. So the fused layer gives the
three layers' outputs bit for bit when the three quantize their input the same way: the same bits, activation
format, static activation scale, group size, symmetry, smoothing factors, rotation and timestep-wise copy. Where
they differ (smoothing factors are computed from each layer's weight, rotation seeds differ per layer), one fused
layer cannot give the same outputs, and fusing raises an error that names the layers and the reason.
`unfuse_qkv_projections()` needs nothing from here: the three layers were never removed.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import nn

from .nn import ViDiTQLinear

GROUPS = {  # fused layer -> the projections it is built from, in diffusers' order
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
FIX = ("quantize these projections with one recipe (no smoothing or rotation for them, e.g. a preset without "
       "calibration, or a plan that gives them the same entries), keep all of them in floating point "
       "(modules_to_not_convert=['to_q', 'to_k', 'to_v']), or leave the projections unfused")


def holds_quantized(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, ViDiTQLinear) for m in module.modules())


def fusion_problem(names: list[str], layers: list[ViDiTQLinear]) -> str | None:
    """Why one `ViDiTQLinear` cannot give these layers' outputs bit for bit, or None when it can."""
    first, spec = layers[0], layers[0].spec
    for name, layer in zip(names[1:], layers[1:]):
        other = layer.spec
        for field in ("in_features", "weight_bits", "act_bits", "group_size", "symmetric", "weight_per_tensor",
                      "act_scale", "rotation_seed", "early_weight_bits", "early_timestep"):
            if getattr(spec, field) != getattr(other, field):
                return (f"'{names[0]}' has {field}={getattr(spec, field)!r} and '{name}' has "
                        f"{field}={getattr(other, field)!r}")
        if (first.bias is None) != (layer.bias is None):
            return f"'{names[0]}' {'has' if first.bias is not None else 'has no'} bias and '{name}' does not match it"
        smooth, other_smooth = first.smoothing(), layer.smoothing()
        if (smooth is None) != (other_smooth is None) or (smooth is not None and not torch.equal(
                first.act_smooth, layer.act_smooth)):
            return (f"'{names[0]}' and '{name}' smooth their input with different factors (smoothing is computed "
                    f"from each layer's own weight), so one layer cannot quantize the input for both")
        if first.weight.dtype != layer.weight.dtype or first.qweight.device != layer.qweight.device:
            return f"'{names[0]}' and '{name}' are in different dtypes or on different devices"
    return None


def fused_quantized(names: list[str], layers: list[ViDiTQLinear]) -> ViDiTQLinear:
    """One `ViDiTQLinear` whose output is the concatenation of `layers`' outputs, bit for bit; a ValueError that
    names the layers and the reason where no such layer exists (`fusion_problem`)."""
    problem = fusion_problem(names, layers)
    if problem:
        raise ValueError(f"fuse_qkv_projections: {', '.join(repr(n) for n in names)} cannot be fused into one "
                         f"quantized layer with the same outputs: {problem}. Fix: {FIX}.")
    first = layers[0]
    rows = [layer.out_features for layer in layers]
    spec = replace(first.spec, out_features=sum(rows), weight_per_tensor=False, json_keys=())
    fused = ViDiTQLinear(spec, device=first.qweight.device, dtype=first.weight.dtype)
    for prefix, bits in (("", spec.weight_bits), ("early_", spec.early_weight_bits)):
        if bits is None:
            continue
        for part in ("qweight", "weight_scale", "weight_zero"):
            tensors = [getattr(layer, prefix + part) for layer in layers]
            if tensors[0] is None:
                continue
            if first.weight_per_tensor:  # one scale (zero point) per layer: repeated per output channel, same math
                tensors = [t.expand(n, t.shape[1]) if part != "qweight" else t for t, n in zip(tensors, rows)]
            setattr(fused, prefix + part, torch.cat(tensors).contiguous())
    if first.act_smooth is not None:
        fused.act_smooth = first.act_smooth.clone()
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
    fused.clock = first.clock  # timestep-wise layers share the model's clock
    return fused


def fused_float(layers: list[nn.Linear]) -> nn.Linear:
    """diffusers' fused projection for layers kept in floating point: the weights and biases concatenated."""
    first = layers[0]
    weight = torch.cat([layer.weight.detach() for layer in layers])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=first.bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if first.bias is not None:
            fused.bias.copy_(torch.cat([layer.bias.detach() for layer in layers]))
    return fused


def fused_layer(attn: nn.Module, leaves: tuple[str, ...], where: str) -> nn.Module:
    """The fused projection of `attn`'s `leaves`: quantized when all are `ViDiTQLinear`, float when all are
    `nn.Linear`; a ValueError naming the layers otherwise (`where`: the attention module's name)."""
    names = [f"{where}.{leaf}" if where else leaf for leaf in leaves]
    layers = [getattr(attn, leaf) for leaf in leaves]
    kinds = {type(layer) for layer in layers}
    if kinds == {ViDiTQLinear}:
        return fused_quantized(names, layers)
    if kinds == {nn.Linear}:
        return fused_float(layers)
    shown = ", ".join(f"'{n}' is a {type(layer).__name__}" for n, layer in zip(names, layers))
    if kinds <= {ViDiTQLinear, nn.Linear}:
        raise ValueError(f"fuse_qkv_projections: {shown}: a quantized and a floating-point projection cannot be "
                         f"fused into one layer. Fix: quantize all of them or keep all of them in floating point "
                         f"(modules_to_not_convert=['to_q', 'to_k', 'to_v']).")
    raise ValueError(f"fuse_qkv_projections: {shown}: only plain projections can be fused, and a LoRA (or another "
                     f"wrapper) would be lost. Fix: fuse_lora() then unload_lora(), or unload the LoRA, first.")


@torch.no_grad()
def fuse_projections(attn: nn.Module, *args, where: str = "", **kwargs) -> None:
    """`attn.fuse_projections(...)` for an attention module with quantized projections (diffusers' own method runs
    when none is quantized any more, e.g. after `dequantize()`). Builds every fused layer first, so an error leaves
    the module as it was."""
    if not any(holds_quantized(getattr(attn, leaf, None)) for leaf in PROJECTIONS):
        return type(attn).fuse_projections(attn, *args, **kwargs)
    if not getattr(attn, "_supports_qkv_fusion", True):
        return None
    fused = {}
    main = "to_kv" if getattr(attn, "is_cross_attention", False) else "to_qkv"
    fused[main] = fused_layer(attn, GROUPS[main], where)
    if all(getattr(attn, leaf, None) is not None for leaf in GROUPS["to_added_qkv"]):
        fused["to_added_qkv"] = fused_layer(attn, GROUPS["to_added_qkv"], where)
    for name, layer in fused.items():
        setattr(attn, name, layer)
    # diffusers' Attention takes `fuse` (PixArt, SD3 pass True); its AttentionModuleMixin sets True
    attn.fused_projections = kwargs.get("fuse", args[0] if args else True)
    return None


def fused_layers(model: nn.Module) -> dict[str, ViDiTQLinear]:
    """{name: layer} of the fused quantized projections `fuse_projections` added to `model`."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, ViDiTQLinear) and name.rpartition(".")[2] in GROUPS}


def install(model: nn.Module) -> None:
    """Give each attention module of `model` with quantized projections the `fuse_projections` above, so the
    model's own `fuse_qkv_projections()` builds fused quantized layers."""
    for name, module in model.named_modules():
        if hasattr(module, "fuse_projections") and any(holds_quantized(getattr(module, leaf, None))
                                                      for leaf in PROJECTIONS):
            module.fuse_projections = functools.partial(fuse_projections, module, where=name)
