"""viditq-diffusers: ViDiT-Q W8A8 / W4A8 quantization for diffusers' diffusion transformers.

Importing this package registers `ViDiTQConfig` with diffusers (`quant_method="viditq"`), with transformers
(>= 5) when it is installed (text encoders, `transformers_quantizer.py`) and, when PEFT is installed, teaches PEFT
to put LoRA adapters on `ViDiTQLinear` layers.
"""

import importlib.util

from .calibration import CalibrationStats, calibrate
from .config import PRESETS, ViDiTQConfig
from .api import quantize
from .diffusers_quantizer import ViDiTQQuantizer, register
from .footprint import fp16_weight_bytes, weight_bytes
from .hub import model_card, push_to_hub, save_pretrained
from .layer_spec import LayerSpec
from .nn import ViDiTQLinear
from .recipe_refine import refine_recipes

register()

if importlib.util.find_spec("transformers") is not None:  # text encoders through transformers' quantizer API
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:  # its loading API (quantize ops) came with 5.0
        from .transformers_quantizer import register as register_transformers

        register_transformers()

if importlib.util.find_spec("peft") is not None:  # LoRA on quantized layers through diffusers / PEFT (lora.py)
    from .lora import enable_peft_support

    enable_peft_support()

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "ViDiTQConfig", "CalibrationStats", "calibrate", "ViDiTQLinear", "ViDiTQQuantizer", "quantize",
    "save_pretrained", "push_to_hub", "model_card", "weight_bytes", "fp16_weight_bytes", "refine_recipes", "LayerSpec",
]
