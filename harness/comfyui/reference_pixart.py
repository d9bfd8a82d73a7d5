"""The trained reference transformer (reference_models/pixart_digits) in ComfyUI's PixArt layout.

Runs in ComfyUI's venv (it uses ComfyUI's own diffusers->ComfyUI key map for PixArt). ComfyUI's
loader detects PixArt only at PixArt-alpha's full size (hidden 1152, 16 heads are hard-coded), so the
file is written in the pack's format, whose metadata carries the explicit `unet_config`; ViDiT-Q Load
reads it as a floating-point model (no plan).

    python -m harness.comfyui.reference_pixart OUT.safetensors      (from the repository root)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "reference_models" / "pixart_digits"


def unet_config() -> dict:
    cfg = json.loads((REFERENCE / "transformer" / "config.json").read_text())
    return {
        "image_model": "pixart_alpha", "patch_size": cfg["patch_size"], "in_channels": cfg["in_channels"],
        "hidden_size": cfg["num_attention_heads"] * cfg["attention_head_dim"], "depth": cfg["num_layers"],
        "num_heads": cfg["num_attention_heads"], "caption_channels": cfg["caption_channels"],
        "micro_condition": False, "pred_sigma": False, "learn_sigma": False, "pe_interpolation": 1.0,
        "model_max_length": 120,
    }


def comfy_state_dict(config: dict) -> dict[str, torch.Tensor]:
    import comfy.utils
    from safetensors.torch import load_file

    diffusers = load_file(REFERENCE / "transformer" / "diffusion_pytorch_model.safetensors")
    out: dict[str, list] = {}
    for src, dst in comfy.utils.pixart_to_diffusers(config).items():
        if src not in diffusers:
            continue
        if isinstance(dst, tuple):  # a slice (dim, offset, size) of a fused ComfyUI tensor (qkv, kv)
            dst, (dim, offset, _) = dst
            out.setdefault(dst, []).append((offset, diffusers[src]))
        else:
            out[dst] = [(0, diffusers[src])]
    sd = {k: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for k, parts in out.items()}
    # the learned null caption of the original PixArt code; diffusers' PixArt has none (unused at inference)
    sd["y_embedder.y_embedding"] = torch.zeros(config["model_max_length"], config["caption_channels"])
    return sd


def patcher(dtype: torch.dtype, manual_cast: torch.dtype | None):
    """The reference as a ComfyUI MODEL whose weights are stored in `dtype` and computed in `manual_cast`
    (None: in `dtype`), built the way ComfyUI's own loader builds a denoiser for a weight dtype."""
    import comfy.model_patcher
    import comfy.supported_models

    config = unet_config()
    model_config = comfy.supported_models.PixArtAlpha(config)
    model_config.set_inference_dtype(dtype, manual_cast)
    base = model_config.get_model({}, "")
    base.diffusion_model.load_state_dict({k: t.to(dtype) for k, t in comfy_state_dict(config).items()})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def write(path: str) -> None:
    sys.path.insert(0, str(REPO))
    from comfyui_nodes import file_format

    config = unet_config()
    meta = {"version": file_format.FORMAT_VERSION, "model_class": "PixArtAlpha", "unet_config": config,
            "dtype": "float32", "plan": None}
    file_format.save(path, comfy_state_dict(config), meta)


if __name__ == "__main__":
    from harness.comfyui import inprocess

    inprocess.import_comfy()
    write(sys.argv[1])
