"""transformers glue: `ViDiTQHfQuantizer` and its registration under `quant_method="viditq"` (text encoders).

`T5EncoderModel.from_pretrained(path, quantization_config=ViDiTQConfig("w8a16"))` goes through transformers' own
loader (transformers >= 5), with the plan and the layers of the diffusers path (`convert.py`):
- floating-point checkpoint + `ViDiTQConfig`: the plan is built on the meta-device model (which linears:
  `text_encoders.py`); transformers hands each planned weight to `ViDiTQQuantize` the moment it is read, which
  swaps the layer for a `ViDiTQLinear`, so no float copy of a planned layer is kept, and the weight's pages of the
  mapped checkpoint file are handed back (`load_memory.py`): the peak while loading stays near the quantized size;
- pre-quantized checkpoint (`config.json` carries the plan): the planned layers are built empty on the meta
  device and the integer codes and scales load into them as they are.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import auto as transformers_auto
from transformers.quantizers.base import HfQuantizer

from .checkpoint import tensor_headers
from .config import ViDiTQConfig, ViDiTQQuantMethod
from .convert import (freeze_quantized_layers, own_aligned_memory, quantized_layer, recorded_plan_problems,
                      resolve_plan, set_submodule, stored_tensor_problems)
from .device_maps import offloads
from .diffusers_quantizer import PLAN_METADATA_KEY, SAFETENSORS_METADATA, Capabilities, recorded_plan_layers
from .load_memory import HeapTrim, release_file_pages
from .nn import ViDiTQLinear
from .plan import plan_to_json, validate_plan
from .text_encoders import is_text_encoder, unsupported_text_encoder


class ViDiTQQuantize(ConversionOps):
    """transformers' quantize-on-load operation: one planned float weight in, its `ViDiTQLinear` swapped in."""

    def __init__(self, quantizer: ViDiTQHfQuantizer):
        self.quantizer = quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, full_layer_name=None,
                missing_keys=None, **kwargs):
        value = next(iter(input_dict.values()))
        weight = value[0] if isinstance(value, list) else value
        self.quantizer.quantize_weight(model, full_layer_name, weight)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}  # the layer's tensors are in place: nothing left for the loader to set


class ViDiTQHfQuantizer(Capabilities, HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: ViDiTQConfig, **kwargs):
        # The user's config object may be reused for another model: never write the plan into it. A config that
        # leaves the precision to the model's default gives this encoder weight-only W8A16.
        super().__init__(copy.deepcopy(quantization_config).for_text_encoder(), **kwargs)
        self.progress = None
        self.heap = HeapTrim()

    @property
    def plan_layers(self) -> dict:
        return (self.quantization_config.plan or {}).get("layers", {})

    def validate_environment(self, *args, device_map=None, **kwargs):
        if offloads(device_map):
            raise ValueError(f"device_map={device_map} offloads modules (to 'cpu' or 'disk'), which ViDiT-Q does not "
                             f"support for transformers text encoders yet; load without device_map (or with "
                             f"device_map={{'': 'cpu'}} or a single accelerator) and move the model afterwards.")

    def check_model(self, model) -> None:
        """Refuse a class without a text-encoder entry (unless the config has a plan) and the denoiser's
        mixed-precision preset, with the fix."""
        config = self.quantization_config
        name = type(model).__name__
        if config.plan is None and not is_text_encoder(name):
            raise ValueError(unsupported_text_encoder(name))
        if config.mixed:
            raise ValueError(f"preset {config.preset!r} is the denoiser's mixed precision (W8 for its FFNs and first "
                             f"and last blocks); it has no rule for {name}. Use 'w8a16' (the text-encoder default), "
                             f"'w4a16' with group_size=... or 'w8a8'.")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        self.check_model(model)
        if not self.pre_quantized:
            config.plan = resolve_plan(model, config)
            self.progress = tqdm(total=len(self.plan_layers), desc="Quantizing", unit="layer", disable=None)
            return model
        if config.plan is None:
            raise ValueError("This checkpoint's quantization_config has no 'plan', so its quantized layout cannot be "
                             "rebuilt. Re-save it with viditq_diffusers, or load the floating-point model with a "
                             "ViDiTQConfig.")
        validate_plan(model, config.plan)
        check_stored_tensors(config.plan, checkpoint_files or [], checkpoint_key_renamer(model))
        for layer_name, spec in self.plan_layers.items():
            dtype = model.get_submodule(layer_name).weight.dtype
            set_submodule(model, layer_name, ViDiTQLinear(spec, device="meta", dtype=dtype))
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        layer, _, leaf = param_name.rpartition(".")
        return (not self.pre_quantized and leaf == "weight" and layer in self.plan_layers
                and isinstance(model.get_submodule(layer), nn.Linear))

    def get_quantize_ops(self):
        return ViDiTQQuantize(self)

    def quantize_weight(self, model, param_name: str, weight: torch.Tensor) -> None:
        """Quantize one FP weight as it is read and swap its layer for a `ViDiTQLinear`."""
        name = param_name.rpartition(".")[0]
        old = model.get_submodule(name)
        layer = quantized_layer(name, weight, None, self.plan_layers[name], self.quantization_config)
        self.plan_layers[name] = layer.spec  # decided: config.json records what the weight decided
        layer.bias = old.bias  # loaded already, or still on meta and set by the loader later
        set_submodule(model, name, layer)
        # read once: neither its pages of the mapped checkpoint nor the freed temporaries need stay resident
        release_file_pages(weight)
        self.heap.quantized(weight)
        if self.progress is not None:
            self.progress.update()

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.heap.close()
        leftovers = [name for name in self.plan_layers if not isinstance(model.get_submodule(name), ViDiTQLinear)]
        if leftovers:
            raise ValueError(f"{len(leftovers)} planned layer(s) got no weight from the checkpoint (e.g. "
                             f"{leftovers[0]!r}); the checkpoint does not match the model config.")
        freeze_quantized_layers(model)
        own_aligned_memory(model)
        first = model.get_submodule(next(iter(self.plan_layers)))
        self.quantization_config.plan["dtype"] = str(first.weight.dtype).removeprefix("torch.")
        self.quantization_config.calibration = None  # the plan now holds what the statistics decided
        model.config.quantization_config = self.quantization_config
        return model

    def get_state_dict_and_metadata(self, model):
        layers = plan_to_json(self.quantization_config.plan)["layers"]
        # the plan the tensors are written with, so a load can refuse a config.json edited afterwards
        return model.state_dict(), {**SAFETENSORS_METADATA, PLAN_METADATA_KEY: json.dumps(layers, sort_keys=True)}

    def is_serializable(self) -> bool:  # a method in transformers (a property in diffusers: Capabilities)
        return True


def checkpoint_key_renamer(model):
    """The model's name of a checkpoint key: transformers renames keys as it loads (Qwen2.5-VL's Hub layout
    `model.layers.*` becomes `model.language_model.layers.*`) and back as it saves, so a saved file holds the
    Hub's names while the plan holds the model's."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    return lambda key: rename_source_key(key, renamings, converters)[0]


def check_stored_tensors(plan: dict, checkpoint_files: list, model_key=lambda key: key) -> None:
    """Refuse a config.json whose plan does not fit the quantized tensors saved with it (as the diffusers path
    does): a plan edited by hand would otherwise load other numbers. `model_key` maps a stored key to the model's
    name for it (`checkpoint_key_renamer`)."""
    headers, recorded = {}, {}
    for path in checkpoint_files:
        if str(path).endswith(".safetensors"):
            headers.update({model_key(key): header for key, header in tensor_headers(str(path)).items()})
            recorded.update(recorded_plan_layers(str(path)))
    if not headers:
        return
    problems = stored_tensor_problems(plan, headers) + (recorded_plan_problems(plan, recorded) if recorded else [])
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise ValueError(
            f"The plan in config.json does not match the weights saved with it ({len(problems)} problem(s)):\n"
            f"  {shown}\nconfig.json was edited or belongs to other weights: restore the config.json saved with "
            f"these weights.")


def register() -> None:
    """Add ViDiT-Q to transformers' quantizer registries (once: a second import finds it there)."""
    key = ViDiTQQuantMethod.VIDITQ.value
    if key not in transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        transformers_auto.register_quantization_config(key)(ViDiTQConfig)
    if key not in transformers_auto.AUTO_QUANTIZER_MAPPING:
        transformers_auto.register_quantizer(key)(ViDiTQHfQuantizer)
