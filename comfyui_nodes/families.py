"""The model families the pack quantizes: ComfyUI denoiser classes whose quantized layers were checked.

The core's default rule (attention / FFN linears inside the block lists, modulation linears kept) is
written for these classes (`viditq_diffusers/architectures.py`) and tested on each of them in ComfyUI;
another class could carry a timestep or embedding linear inside its blocks that the rule would quantize.
So ViDiT-Q Quantize with a preset refuses other classes by name; a plan file decides every layer itself
and is accepted for any class it fits. The pack's README lists the same classes.
"""

from __future__ import annotations

FAMILIES = {  # ComfyUI denoiser class -> family
    "PixArtMS": "PixArt (alpha / sigma)",
    "Flux": "Flux",
    "OpenAISignatureMMDITWrapper": "SD3 / SD3.5",
    "WanModel": "Wan 2.1",
}


def check_family(denoiser_class: str, model_class: str, has_plan: bool) -> None:
    """Raise a ValueError naming the supported families unless the denoiser is one of them (or a plan is given)."""
    if denoiser_class in FAMILIES or has_plan:
        return
    known = ", ".join(f"{family} ({cls})" for cls, family in FAMILIES.items())
    raise ValueError(f"ViDiT-Q Quantize presets support {known}; this MODEL's denoiser is {denoiser_class} "
                     f"({model_class}), whose layers the preset rule was not checked on. Use one of those "
                     f"families, or give plan_file: a ViDiT-Q plan made for {denoiser_class}, which names every "
                     f"layer to quantize.")
