"""Per text-encoder knowledge: which linear layers of a transformers text encoder are quantized by default.

The rule is the denoiser's (`architectures.py`): the attention and feed-forward linears inside the encoder's
blocks are quantized; everything else stays in floating point: token / position embeddings (and T5's relative
attention bias, an embedding), the final norm, CLIP's `text_projection`, and the class's own
`_keep_in_fp32_modules_strict`. The class's `_keep_in_fp32_modules` (T5's and UMT5's `wo`, the feed-forward output
whose activations overflow fp16) are quantized weight-only in every preset (`architectures.is_weight_only_by_default`).
A block list is a dotted path to the ModuleList of blocks.

The encoders' default precision is weight-only W8A16 (`TEXT_ENCODER_PRESET`): T5's activations have a few
outlier channels far larger than the typical one, next to which per-token 8-bit activations round the rest away,
and a text encoder runs once per prompt (not once per denoising step), so its weight memory matters far more than
its speed.
"""

from __future__ import annotations

# class name -> dotted paths of its ModuleLists of blocks (names as transformers 5 builds these classes)
TEXT_ENCODER_BLOCKS: dict[str, tuple[str, ...]] = {
    "T5EncoderModel": ("encoder.block",),  # PixArt, SD3, Flux, LTX, Mochi, CogVideoX
    "UMT5EncoderModel": ("encoder.block",),  # Wan 2.1
    "CLIPTextModel": ("encoder.layers",),  # SD3, Flux, HunyuanVideo
    "CLIPTextModelWithProjection": ("text_model.encoder.layers",),  # SD3 (text_projection stays FP)
    "Gemma2Model": ("layers",),  # Sana
    "LlamaModel": ("layers",),  # HunyuanVideo
    # QwenImage loads its encoder as Qwen2_5_VLForConditionalGeneration: only the language model's decoder layers
    # are quantized; the vision tower (`visual`) and `lm_head` stay FP. The bare models hold the same layers.
    "Qwen2_5_VLForConditionalGeneration": ("model.language_model.layers",),
    "Qwen2_5_VLModel": ("language_model.layers",),
    "Qwen2_5_VLTextModel": ("layers",),
}

TEXT_ENCODER_PRESET = "w8a16"  # a text encoder's default: weight-only int8 (see the module docstring)


def is_text_encoder(class_name: str) -> bool:
    return class_name in TEXT_ENCODER_BLOCKS


def unsupported_text_encoder(class_name: str) -> str:
    """The error message for a transformers model class without a text-encoder entry."""
    return (f"ViDiT-Q does not know which linear layers of {class_name} to quantize: supported transformers "
            f"text encoders are {', '.join(TEXT_ENCODER_BLOCKS)}. Load the model without quantization_config, or "
            f"pass an explicit plan (ViDiTQConfig(plan=...)) naming the layers to quantize.")
