"""Stand-in ComfyUI nodes (tests and benchmarks/comfyui.py) for the reference pipeline's text encoder and VAE.

ComfyUI cannot build reference_models/pixart_digits' tiny T5 (its T5 configs are fixed at XXL size)
nor its VAE (GroupNorm with 32 groups is hard-coded; this VAE has 16-channel blocks), so the tests
and the benchmark encode prompts and decode latents with transformers / diffusers here. Never shipped with the pack.
"""

from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parents[3] / "reference_models" / "pixart_digits"
SD15_SCALE = 0.18215  # ComfyUI's latent format for PixArt-alpha divides the model's latents by this
_cache = {}


def _load(kind):
    if kind not in _cache:
        if kind == "text":
            from transformers import T5EncoderModel, T5Tokenizer

            _cache[kind] = (T5Tokenizer.from_pretrained(REFERENCE / "tokenizer"),
                            T5EncoderModel.from_pretrained(REFERENCE / "text_encoder").eval())
        else:
            from diffusers import AutoencoderKL

            _cache[kind] = AutoencoderKL.from_pretrained(REFERENCE / "vae").eval()
    return _cache[kind]


class DigitsTextEncode:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "a handwritten digit 7"})}}

    @torch.no_grad()
    def encode(self, text):
        tokenizer, encoder = _load("text")
        ids = tokenizer([text], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
        return ([[encoder(ids.input_ids, attention_mask=ids.attention_mask)[0], {}]],)


class DigitsVAEDecode:
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    @torch.no_grad()
    def decode(self, samples):
        vae = _load("vae")
        latents = samples["samples"].float() * SD15_SCALE / vae.config.scaling_factor
        images = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1),)


NODE_CLASS_MAPPINGS = {"ViDiTQTestDigitsTextEncode": DigitsTextEncode, "ViDiTQTestDigitsVAEDecode": DigitsVAEDecode}
