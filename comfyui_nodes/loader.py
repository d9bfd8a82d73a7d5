"""Build a ComfyUI MODEL from the pack's file (file_format.py) with no floating-point copy of quantized layers.

The denoiser is constructed on the meta device by ComfyUI's own model class, the planned linears are
replaced by empty `ViDiTQLinear`s (the plan gives their layout), and the file's tensors are assigned.
"""

from __future__ import annotations

import itertools

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import torch

from viditq_diffusers.convert import own_aligned_memory, set_submodule
from viditq_diffusers.nn import ViDiTQLinear
from viditq_diffusers.plan import plan_from_json, validate_plan

from .patching import mark_quantized, refuse_timestep_wise


def model_config_class(name: str):
    classes = {cls.__name__: cls for cls in comfy.supported_models.models}
    if name not in classes:
        raise ValueError(f"the file was saved from a {name} model, which this ComfyUI does not know "
                         f"(known: {', '.join(sorted(classes))}); update ComfyUI.")
    return classes[name]


def build_model(meta: dict, tensors: dict[str, torch.Tensor]):
    """A ModelPatcher for the metadata and tensors of a file written by ViDiT-Q Save."""
    dtype = getattr(torch, meta["dtype"])
    model_config = model_config_class(meta["model_class"])(meta["unet_config"])
    load_device = comfy.model_management.get_torch_device()
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    base = model_config.get_model({}, "", device="meta")  # no weight memory for the denoiser yet
    tree = base.diffusion_model
    plan = meta.get("plan")
    if plan:
        plan = plan_from_json(plan)
        refuse_timestep_wise(plan)
        validate_plan(tree, plan)
        for name, spec in plan["layers"].items():
            set_submodule(tree, name, ViDiTQLinear(spec, device="meta", dtype=dtype))
    missing, unexpected = tree.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"the file's tensors do not match its {meta['model_class']} config: missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.")
    unset = [n for n, t in itertools.chain(tree.named_parameters(), tree.named_buffers()) if t.is_meta]
    if unset:
        raise ValueError(f"{len(unset)} tensor(s) of the denoiser are not in the file (e.g. {unset[0]!r}).")
    own_aligned_memory(tree)  # CPU kernels pick code paths by alignment: keeps reloads bit-identical
    base.to(comfy.model_management.unet_offload_device())
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device,
                                               offload_device=comfy.model_management.unet_offload_device())
    if plan:
        mark_quantized(patcher, plan)
    return patcher
