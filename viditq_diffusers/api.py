"""`quantize(model, config)`: ViDiT-Q quantization of an already-loaded diffusers model or transformers text encoder.

It gives the model what `from_pretrained(..., quantization_config=config)` gives it (the same layers, the
diffusers or transformers quantizer attached), so everything that works on a model loaded that way works on this one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .convert import quantized_layers, set_submodule
from .diffusers_quantizer import ViDiTQQuantizer


@torch.no_grad()
def quantize(model: nn.Module, config) -> nn.Module:
    """Quantize an already-loaded diffusers model or transformers text encoder in place (and return it).

    Sets what `from_pretrained(..., quantization_config=config)` sets, so `save_pretrained`,
    `push_to_hub`, `.to(device)` and reloading work the same way.
    """
    if is_transformers_model(model):
        return quantize_text_encoder(model, config)
    config = copy.deepcopy(config)
    plan, layers = quantized_layers(model, config)
    for name, layer in layers:
        set_submodule(model, name, layer)
    config.plan = plan
    config.calibration = None  # the plan (and the act_smooth tensors) now hold what the statistics decided
    quantizer = ViDiTQQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel"
               for cls in type(model).__mro__)


def quantize_text_encoder(model: nn.Module, config) -> nn.Module:
    """`quantize` for a transformers model: the encoder default (W8A16 where no precision was chosen), the
    transformers quantizer attached as its `from_pretrained` attaches it."""
    from .transformers_quantizer import ViDiTQHfQuantizer

    quantizer = ViDiTQHfQuantizer(config.for_text_encoder(), pre_quantized=False)
    quantizer.check_model(model)
    plan, layers = quantized_layers(model, quantizer.quantization_config)
    for name, layer in layers:
        set_submodule(model, name, layer)
    quantizer.quantization_config.plan = plan
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # config.json's quantization_config, frozen layers, is_quantized
    return model
