"""Per-architecture knowledge: which linear layers are quantized by default.

ViDiT-Q quantizes the attention and feed-forward linears inside the transformer blocks and
keeps the rest in floating point (docs/method.md, section 2): patch/timestep/caption/text
embedders, adaLN / modulation projections (`norm*.linear`, `*_mod.*`), the output
projection (`proj_out`, `norm_out`), the model's own `_keep_in_fp32_modules`, and every
non-Linear layer (convs, norms). The rule is declarative: a block list name, then a
pattern for the modulation linears that live inside blocks. transformers text encoders have their
table in `text_encoders.py` (nested block lists such as T5's `encoder.block`).
"""

from __future__ import annotations

import re

from torch import nn

from .text_encoders import TEXT_ENCODER_BLOCKS

# Top-level ModuleLists that hold the transformer blocks, per zoo class. HunyuanVideo's
# `context_embedder.token_refiner.refiner_blocks` is a text embedder and stays FP.
BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "DiTTransformer2DModel": ("transformer_blocks",),
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "SanaTransformer2DModel": ("transformer_blocks",),
    "HunyuanDiT2DModel": ("blocks",),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "CogVideoXTransformer3DModel": ("transformer_blocks",),
    "LatteTransformer3DModel": ("transformer_blocks", "temporal_transformer_blocks"),
    "AllegroTransformer3DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
    "LTXVideoTransformer3DModel": ("transformer_blocks",),
    "MochiTransformer3DModel": ("transformer_blocks",),
    "SanaVideoTransformer3DModel": ("transformer_blocks",),
    # ComfyUI's own denoiser classes (quantized by the ComfyUI node pack, comfyui_nodes/)
    "PixArtMS": ("blocks",),
    "Flux": ("double_blocks", "single_blocks"),
    "OpenAISignatureMMDITWrapper": ("joint_blocks",),  # SD3 / SD3.5
    "WanModel": ("blocks",),
}
DEFAULT_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "temporal_transformer_blocks", "blocks")

# Inside a block: adaLN / modulation linears (`norm1.linear`, `norm1_context.linear`,
# DiT's per-block `norm1.emb.*`, Qwen's `img_mod.1`; in ComfyUI's classes Flux's `img_mod.lin` /
# `modulation.lin` and SD3's `adaLN_modulation.1`) take the 2-D timestep embedding.
MODULATION = re.compile(r"(^|\.)(norm\w*|\w+_mod|\w*modulation)\.")


def block_lists(model: nn.Module) -> tuple[str, ...]:
    """Dotted paths of the model's ModuleLists of blocks (transformers text encoders: `text_encoders.py`)."""
    name = type(model).__name__
    return BLOCK_LISTS.get(name) or TEXT_ENCODER_BLOCKS.get(name) or DEFAULT_BLOCK_LISTS


def is_quantized_by_default(model: nn.Module, name: str) -> bool:
    """Whether the nn.Linear called `name` is quantized by default (attention / FFN in a block)."""
    inside = [match.group(1) for blocks in block_lists(model)
              if (match := re.match(rf"{re.escape(blocks)}\.\d+\.(.+)$", name))]
    if not inside or MODULATION.search(inside[0]):
        return False
    if is_weight_only_by_default(model, name):
        return True
    # transformers' `_keep_in_fp32_modules_strict` (fp32 in bf16 loads too) is kept in floating point as well
    keep_fp32 = {*(getattr(model, "_keep_in_fp32_modules", None) or []),
                 *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])}
    return not any(part in keep_fp32 for part in name.split("."))


def is_weight_only_by_default(model: nn.Module, name: str) -> bool:
    """Whether the layer `name` of a transformers text encoder is in its `_keep_in_fp32_modules` (T5's and UMT5's
    `wo`). Such a layer is quantized weight-only whatever the preset: its activations (the ones that overflow
    fp16) are never quantized, and it computes in the dtype transformers gives it (fp32 in fp16 loads), while its
    weight, a fifth of T5's bytes, is stored in 8 or 4 bits (`text_encoders.py`)."""
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    return type(model).__name__ in TEXT_ENCODER_BLOCKS and any(part in keep_fp32 for part in name.split("."))


def default_layers(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers quantized by default, in module order (what calibration records unless told
    otherwise)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and is_quantized_by_default(model, name)]
