"""The pack's file: one safetensors file in `models/diffusion_models` that rebuilds its model alone.

Tensors: the denoiser's state dict (ComfyUI's key names, no prefix), with the quantized layers' integer
buffers. Metadata `viditq_comfyui` (JSON): format version, ComfyUI's model class (a
`comfy.supported_models` class, e.g. "PixArtAlpha"), its `unet_config` (the constructor arguments of
the denoiser), the compute dtype and the ViDiT-Q plan (absent for a floating-point file). Loading builds
the denoiser on the meta device, swaps in empty `ViDiTQLinear`s from the plan and assigns the file's
tensors, so the floating-point weights of quantized layers never exist in memory.
"""

from __future__ import annotations

import json
import os

import torch

from viditq_diffusers.atomic import atomic_path
from viditq_diffusers.plan import plan_to_json

METADATA_KEY = "viditq_comfyui"
FORMAT_VERSION = 1


def json_safe(config: dict) -> dict:
    """`unet_config` without what JSON cannot hold (the dtype is stored on its own; the model class
    re-adds its `unet_extra_config` when built)."""
    out = {}
    for key, value in config.items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out


def describe(base_model, plan: dict | None) -> dict:
    """The metadata for a ComfyUI `BaseModel` (a MODEL's `.model`)."""
    model_config = base_model.model_config
    return {
        "version": FORMAT_VERSION,
        "model_class": type(model_config).__name__,
        "unet_config": json_safe(model_config.unet_config),
        "dtype": str(base_model.get_dtype()).removeprefix("torch."),
        "plan": None if plan is None else plan_to_json(plan),
    }


def save(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write atomically (`viditq_diffusers.atomic.atomic_path`)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata={METADATA_KEY: json.dumps(meta)})


def read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file written by `save`; a ValueError that names the problem otherwise."""
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise ValueError(f"{name} has no {METADATA_KEY!r} metadata, so it was not written by ViDiT-Q Save; "
                                 f"load it with the stock 'Load Diffusion Model' node.")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{name} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    meta = json.loads(raw)
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{name} has ViDiT-Q file format version {meta.get('version')!r}; this pack reads "
                         f"version {FORMAT_VERSION}. Update the pack or save the model again.")
    return meta, tensors
