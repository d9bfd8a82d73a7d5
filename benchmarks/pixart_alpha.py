"""The PixArt-alpha 512x512 transformer, randomly initialized, shared by the benchmark scripts.

`CONFIG` is the config of PixArt-alpha/PixArt-XL-2-512x512's transformer, as diffusers'
`scripts/convert_pixart_alpha_to_diffusers.py` builds it for `--image_size 512`
(interpolation_scale 1, no micro-conditions): 28 blocks, hidden 1152, ~611M parameters.
"""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

CONFIG = dict(
    sample_size=64, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4, out_channels=8,
    patch_size=2, attention_bias=True, cross_attention_dim=1152, caption_channels=4096,
    activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    num_embeds_ada_norm=1000, interpolation_scale=1, use_additional_conditions=False,
)


def build(dtype: torch.dtype = torch.float32, num_layers: int = 28, seed: int = 0) -> PixArtTransformer2DModel:
    """A fresh model with `torch.nn.init` default weights (same seed -> same weights), in eval mode."""
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**{**CONFIG, "num_layers": num_layers})
    # nn.Module.to: ModelMixin.to warns about `_keep_in_fp32_modules`, which PixArt leaves empty.
    return torch.nn.Module.to(model, dtype).eval().requires_grad_(False)


def inputs(dtype: torch.dtype, batch: int = 2, latent: int = 32, text_tokens: int = 120, seed: int = 1) -> dict:
    """Forward kwargs: latent `[batch, 4, latent, latent]` (= (latent/2)^2 image tokens), T5-sized captions."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, CONFIG["in_channels"], latent, latent, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_tokens, CONFIG["caption_channels"], generator=g).to(dtype),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
