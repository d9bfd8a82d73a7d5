"""The pack's file: one safetensors file in `models/diffusion_models` that rebuilds its model alone.

Tensors: the denoiser's state dict (ComfyUI's key names, no prefix), with the quantized layers' integer
buffers. Metadata `viditq_comfyui` (JSON): format version, ComfyUI's model class (a
`comfy.supported_models` class, e.g. "PixArtAlpha"), its `unet_config` (the constructor arguments of
the denoiser), the compute dtype and the ViDiT-Q plan (absent for a floating-point file). Loading builds
the denoiser on the meta device, swaps in empty `ViDiTQLinear`s from the plan and assigns the file's
tensors, so the floating-point weights of quantized layers never exist in memory.

`read` checks the metadata's fields and every quantized layer's tensors (names, dtypes, shapes, from the layer's
plan entry) before any model is built: a damaged or hand-edited file fails there, naming the file, the field or
tensor, what it holds and what it should hold, not at the first sampling step.
"""

from __future__ import annotations

import json
import os

import torch

from viditq_diffusers.atomic import atomic_path
from viditq_diffusers.nn import ViDiTQLinear
from viditq_diffusers.plan import plan_from_json, plan_to_json

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
    """(metadata, tensors) of a file written by `save`; a ValueError that names the file and the problem otherwise."""
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
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: its {METADATA_KEY!r} metadata is not valid JSON ({e}); the file was damaged or "
                         f"edited: save the model again with ViDiT-Q Save.") from None
    check_metadata(name, meta)
    if meta["plan"] is not None:
        check_quantized_tensors(name, plan_from_json(meta["plan"]), tensors, getattr(torch, meta["dtype"]))
    return meta, tensors


def bad(name: str, what: str) -> ValueError:
    return ValueError(f"{name}: {what}; the file was damaged or edited: save the model again with ViDiT-Q Save.")


def check_metadata(name: str, meta) -> None:
    """The metadata's fields have the types `describe` writes (the plan is checked by `plan_from_json`)."""
    if not isinstance(meta, dict):
        raise bad(name, f"its {METADATA_KEY!r} metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{name} has ViDiT-Q file format version {meta.get('version')!r}; this pack reads "
                         f"version {FORMAT_VERSION}. Update the pack or save the model again.")
    for key, kind in (("model_class", str), ("unet_config", dict), ("dtype", str)):
        if not isinstance(meta.get(key), kind):
            raise bad(name, f"metadata field {key!r} must be a {kind.__name__}, got {meta.get(key)!r}")
    dtype = getattr(torch, meta["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise bad(name, f"metadata field 'dtype' must name a torch floating-point dtype (e.g. 'float32'), got "
                        f"{meta['dtype']!r}")
    if "plan" not in meta:
        raise bad(name, "its metadata has no 'plan' field (null for a floating-point model)")
    if meta["plan"] is not None:
        try:
            plan_from_json(meta["plan"])
        except (ValueError, TypeError, KeyError) as e:
            raise bad(name, f"the plan in its metadata is invalid ({e})") from None


def check_quantized_tensors(name: str, plan: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Each planned layer's tensors are those its `ViDiTQLinear` holds: integer buffers (codes, scale bits, zero
    points) with exactly its dtype and shape, floating ones (bias) with its shape."""
    for layer, spec in plan["layers"].items():
        try:
            expected = ViDiTQLinear(spec, device="meta", dtype=dtype).state_dict()
        except ValueError as e:
            raise bad(name, f"the plan entry of layer {layer!r} is invalid ({e})") from None
        for key, want in expected.items():
            got = tensors.get(f"{layer}.{key}")
            if got is None:
                raise bad(name, f"quantized layer {layer!r} ({spec.label()}) has no {key!r} tensor")
            same_kind = got.dtype == want.dtype if not want.dtype.is_floating_point else got.dtype.is_floating_point
            if not same_kind or got.shape != want.shape:
                described = lambda t: f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"  # noqa: E731
                raise bad(name, f"tensor {layer}.{key} is {described(got)}, but layer {layer!r} ({spec.label()}) "
                                f"stores {described(want)}")
