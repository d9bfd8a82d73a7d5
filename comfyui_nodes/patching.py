"""Non-destructive quantization of a ComfyUI MODEL: the quantized layers ride on a clone as object patches.

A ComfyUI MODEL is a `ModelPatcher`; its clones share one module tree. Object patches swap modules on
that tree only while the clone is loaded, so the FP MODEL in the same graph keeps its own layers. ComfyUI
unpatches lazily: after a clone ran, its patches may still sit on the shared tree (the originals are in
the clones' shared `object_patches_backup`). `loaded_tree` therefore loads the given MODEL first, which
restores the originals and applies that MODEL's own patches, before anything reads the tree.
"""

from __future__ import annotations

import uuid

import comfy.lora
import comfy.model_management
import comfy.utils
import torch
import torch.nn.functional as F
from comfy.patcher_extension import CallbacksMP

from viditq_diffusers.convert import quantized_layers
from viditq_diffusers.quant.low_rank import add_low_rank

from .families import check_family

PREFIX = "diffusion_model."
PLAN = "viditq_plan"  # key of the plan in ModelPatcher.attachments (copied by reference into clones)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the quantizer reads weights from


def loaded_tree(model):
    """The denoiser module tree exactly as `model` (a ModelPatcher) sees it."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    return model.model.diffusion_model


def plan_of(model) -> dict | None:
    """The ViDiT-Q plan of a quantized MODEL (None for a floating-point one)."""
    return model.attachments.get(PLAN)


def quantize_model(model, config):
    """A clone of `model` whose planned linears are `ViDiTQLinear` object patches; `model` is untouched."""
    if plan_of(model) is not None:
        raise ValueError("this MODEL is already ViDiT-Q quantized; quantizing twice would re-round integer weights. "
                         "Connect the floating-point MODEL instead.")
    refuse_unsupported_dtype(model)
    denoiser, model_class = type(model.model.diffusion_model).__name__, type(model.model).__name__
    plan = config.plan
    if plan is not None and plan.get("model_class") not in (None, denoiser):
        raise ValueError(f"the plan was made for {plan['model_class']}, but this MODEL's denoiser is "
                         f"{denoiser} ({model_class}); use a plan made for this model family, or a preset.")
    check_family(denoiser, model_class, plan is not None)
    if plan is not None:
        refuse_timestep_wise(plan)
    tree = loaded_tree(model)
    plan, layers = quantized_layers(tree, config)
    quantized = model.clone()
    for name, layer in layers:  # kept on the offload device until the clone is loaded, like the FP weights
        quantized.add_object_patch(PREFIX + name, layer.to(model.offload_device))
        for key in [k for k in quantized.patches if k.startswith(f"{PREFIX}{name}.")]:
            del quantized.patches[key]  # a LoRA on `model` was read from the patched weights: it is quantized in
    quantized.patches_uuid = uuid.uuid4()  # the weight patches changed
    first = quantized.object_patches[PREFIX + next(iter(plan["layers"]))]
    plan["dtype"] = str(first.weight.dtype).removeprefix("torch.")
    mark_quantized(quantized, plan)
    return quantized


def mark_quantized(model, plan: dict) -> None:
    """Attach the plan, and refuse weight patches (LoRA) on quantized layers rather than lose them."""
    model.attachments[PLAN] = plan
    model.add_callback(CallbacksMP.ON_LOAD, refuse_weight_patches)


def refuse_weight_patches(model, *_) -> None:
    """ComfyUI's weight patches add a delta to `layer.weight`; a ViDiTQLinear keeps integer codes instead,
    and the stock loader would only log a shape mismatch and sample without the LoRA."""
    layers = plan_of(model)["layers"]
    hit = sorted(k for k in model.patches if k.startswith(PREFIX) and k[len(PREFIX):].rpartition(".")[0] in layers)
    if hit:
        raise ValueError(f"{len(hit)} weight patch(es) (e.g. a LoRA from LoraLoader) target ViDiT-Q quantized "
                         f"layers (e.g. {hit[0]!r}), whose integer weights cannot take them. Use the ViDiT-Q LoRA node "
                         f"on the quantized MODEL instead (a float low-rank branch), or Apply the LoRA to "
                         f"the floating-point MODEL before ViDiT-Q Quantize: it is then quantized in.")


def refuse_unsupported_dtype(model) -> None:
    """fp16 / bf16 weights are quantized like fp32 ones (the layers then run in ComfyUI's compute dtype,
    manual cast or not); float8 weights are already rounded, and the quantizer's checks cannot read them."""
    dtype = model.model.get_dtype()
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"ViDiT-Q Quantize reads float32, float16 or bfloat16 weights, but this MODEL stores its "
                         f"weights as {str(dtype).removeprefix('torch.')} (e.g. Load Diffusion Model with an fp8 "
                         f"weight_dtype); load the model with weight_dtype 'default' before quantizing it.")


def refuse_timestep_wise(plan: dict) -> None:
    """Timestep-wise layers (an early weight copy) need a clock hook on the denoiser's forward, which would
    stay on the module tree that the FP MODEL shares; not wired into ComfyUI yet."""
    timed = [name for name, spec in plan["layers"].items() if spec.early_weight_bits is not None]
    if timed:
        raise ValueError(f"the plan has {len(timed)} timestep-wise layer(s) (e.g. {timed[0]!r}: early_weight_bits), "
                         f"which the ComfyUI nodes do not support yet; use a plan without early_weight_bits.")


class QuantizedLoraLinear(torch.nn.Module):
    """A ViDiT-Q layer plus a float LoRA branch: `base(x) + scaling * up(down(x))` on the layer's original
    input, the same forward as the core's `ViDiTQLoraLinear` (without its PEFT dependency, which ComfyUI's
    venv need not have); the base layer is shared and never modified."""

    def __init__(self, base, down: torch.Tensor, up: torch.Tensor, scaling: float):
        super().__init__()
        self.base = base
        self.register_buffer("lora_down", down, persistent=False)
        self.register_buffer("lora_up", up, persistent=False)
        self.scaling = scaling

    def forward(self, x, *args, **kwargs):
        result = self.base(x, *args, **kwargs)
        down = F.linear(x.to(self.lora_down.dtype), self.lora_down.to(x.device))
        return add_low_rank(result, down, self.lora_up.to(x.device), None, self.scaling)


def apply_lora(model, lora_path: str, strength: float):
    """A clone of the quantized `model` with the LoRA file's layers: quantized targets get a float branch
    (object patch wrapping the ViDiT-Q layer), the others an ordinary ComfyUI weight patch. Keys are those
    ComfyUI's LoraLoader understands for this model family (kohya `lora_unet_*`, diffusers `transformer.*`,
    ComfyUI module names `diffusion_model.*`)."""
    plan = plan_of(model)
    if plan is None:
        raise ValueError("ViDiT-Q LoRA takes a quantized MODEL (from ViDiT-Q Quantize or ViDiT-Q Load); "
                         "on a floating-point MODEL use the stock LoraLoader.")
    loaded_tree(model)  # the key map reads the module tree, which another clone may have left patched
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.utils.load_torch_file(lora_path, safe_load=True), key_map)
    if not patches:
        raise ValueError(f"no key of the LoRA file {lora_path!r} matches a layer of this MODEL.")
    out = model.clone()
    plain = {}
    for full_key, patch in patches.items():
        key, rows = (full_key, None) if isinstance(full_key, str) else (full_key[0], full_key[1:])
        name = key[len(PREFIX):].removesuffix(".weight") if key.startswith(PREFIX) else None
        if name is None or name not in plan["layers"] or not key.endswith(".weight"):
            plain[full_key] = patch
            continue
        if rows is not None and (len(rows) != 1 or rows[0][0] != 0):
            raise ValueError(f"LoRA patch on quantized layer {name!r} uses a form ViDiT-Q LoRA does not support.")
        weights = getattr(patch, "weights", None)
        if getattr(patch, "name", None) != "lora" or weights[3] is not None or weights[4] is not None:
            raise ValueError(f"LoRA patch on quantized layer {name!r} is not a plain LoRA (LoCon mid / DoRA / "
                             f"other adapters are not supported on ViDiT-Q layers).")
        up, down, alpha = weights[0].float(), weights[1].float(), weights[2]
        scaling = strength * ((alpha / down.shape[0]) if alpha is not None else 1.0)
        module = key.removesuffix(".weight")
        base = out.object_patches.get(module)  # a second LoRA wraps the first: branches stack
        if base is None:
            base = comfy.utils.get_attr(model.model, module)
        up = up.flatten(1)
        if rows is not None:  # a diffusers to_q / to_k / to_v LoRA on ComfyUI's fused qkv: its slice of rows
            _, offset, size = rows[0]
            inner = base
            while isinstance(inner, QuantizedLoraLinear):
                inner = inner.base
            full = torch.zeros(inner.out_features, up.shape[1], dtype=up.dtype)
            full[offset:offset + size] = up
            up = full
        out.add_object_patch(module, QuantizedLoraLinear(base, down.flatten(1), up, float(scaling)))
    if plain:
        out.add_patches(plain, strength)
    return out
