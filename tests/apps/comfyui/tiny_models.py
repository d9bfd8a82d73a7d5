"""Tiny random ComfyUI denoisers of the other families the pack supports (Flux, SD3, Wan 2.1 T2V).

Each is built by ComfyUI's own model class from a small `unet_config`, given seeded random weights, and
written as a floating-point file in the pack's format (like reference_pixart.py), with a matching
conditioning and latent for sampling. Runs in ComfyUI's venv.
"""

from __future__ import annotations

import torch

TEXT_DIM = 32
FAMILIES = {
    "flux": ("Flux", {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": TEXT_DIM,
                      "context_in_dim": TEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                      "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                      "qkv_bias": True, "guidance_embed": False, "txt_ids_dims": []}),
    "sd3": ("SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                    "adm_in_channels": TEXT_DIM, "num_patches": 256, "pos_embed_max_size": 16,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": TEXT_DIM, "out_features": 128}},
                    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}),
    "wan": ("WAN21_T2V", {"image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "freq_dim": 64,
                          "text_dim": TEXT_DIM, "in_dim": 16, "out_dim": 16, "num_heads": 2, "num_layers": 2}),
}
LATENTS = {"flux": (1, 16, 16, 16), "sd3": (1, 16, 16, 16), "wan": (1, 16, 2, 8, 8)}


@torch.no_grad()
def random_state_dict(model_class: str, unet_config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.supported_models

    (cls,) = [c for c in comfy.supported_models.models if c.__name__ == model_class]
    model_config = cls(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    tree = model_config.get_model({}, "").diffusion_model
    gen = torch.Generator().manual_seed(seed)
    for name, p in tree.named_parameters():  # ComfyUI's ops leave weights uninitialised
        if p.ndim == 1:
            p.copy_(torch.ones_like(p) if name.endswith("weight") or name.endswith("scale") else torch.zeros_like(p))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    for name, b in tree.named_buffers():  # e.g. SD3's pos_embed, a loaded buffer left as torch.empty
        if b.is_floating_point():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return tree.state_dict()


def write(family: str, path: str) -> None:
    from comfyui_nodes import file_format

    model_class, config = FAMILIES[family]
    meta = {"version": file_format.FORMAT_VERSION, "model_class": model_class, "unet_config": config,
            "dtype": "float32", "plan": None}
    file_format.save(path, random_state_dict(model_class, config), meta)


def conditioning(family: str, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    extra = {} if family == "wan" else {"pooled_output": torch.randn(1, TEXT_DIM, generator=gen)}
    return [[torch.randn(1, 8, TEXT_DIM, generator=gen), extra]]
