"""Non-destructive quantization of a ComfyUI MODEL: the quantized layers ride on a clone as object patches.

A ComfyUI MODEL is a `ModelPatcher`; its clones share one module tree. Object patches swap modules on
that tree only while the clone is loaded, so the FP MODEL in the same graph keeps its own layers. ComfyUI
unpatches lazily: after a clone ran, its patches may still sit on the shared tree (the originals are in
the clones' shared `object_patches_backup`). `loaded_tree` therefore loads the given MODEL first, which
restores the originals and applies that MODEL's own patches, before anything reads the tree.
"""

from __future__ import annotations

import uuid

import comfy.model_management
from comfy.patcher_extension import CallbacksMP

from viditq_diffusers.convert import quantized_layers

PREFIX = "diffusion_model."
PLAN = "viditq_plan"  # key of the plan in ModelPatcher.attachments (copied by reference into clones)


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
    tree = loaded_tree(model)
    plan = config.plan
    if plan is not None and plan.get("model_class") not in (None, type(tree).__name__):
        raise ValueError(f"the plan was made for {plan['model_class']}, but this MODEL's denoiser is "
                         f"{type(tree).__name__} ({type(model.model).__name__}); use a plan made for this model "
                         f"family, or a preset.")
    if plan is not None:
        refuse_timestep_wise(plan)
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
                         f"layers (e.g. {hit[0]!r}), whose integer weights cannot take them. Apply the LoRA to "
                         f"the floating-point MODEL before ViDiT-Q Quantize: it is then quantized in.")


def refuse_timestep_wise(plan: dict) -> None:
    """Timestep-wise layers (an early weight copy) need a clock hook on the denoiser's forward, which would
    stay on the module tree that the FP MODEL shares; not wired into ComfyUI yet."""
    timed = [name for name, spec in plan["layers"].items() if spec.get("early_weight_bits") is not None]
    if timed:
        raise ValueError(f"the plan has {len(timed)} timestep-wise layer(s) (e.g. {timed[0]!r}: early_weight_bits), "
                         f"which the ComfyUI nodes do not support yet; use a plan without early_weight_bits.")
