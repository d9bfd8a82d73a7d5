"""`quantize(model, config)`: ViDiT-Q quantization of an already-loaded diffusers model.

It gives the model what `from_pretrained(..., quantization_config=config)` gives it (the same layers, the
diffusers quantizer attached), so everything that works on a model loaded that way works on this one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .convert import quantized_layers, set_submodule
from .diffusers_quantizer import ViDiTQQuantizer


@torch.no_grad()
def quantize(model: nn.Module, config) -> nn.Module:
    """Quantize an already-loaded diffusers model in place (and return it).

    Sets what `from_pretrained(..., quantization_config=config)` sets, so `save_pretrained`,
    `push_to_hub`, `.to(device)` and reloading work the same way.
    """
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
