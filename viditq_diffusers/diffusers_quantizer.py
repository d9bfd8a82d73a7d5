"""diffusers glue: `ViDiTQQuantizer` and its registration under `quant_method="viditq"`.

Two loading paths, one plan:
- floating-point checkpoint + `ViDiTQConfig`: the plan is built on the meta-device model;
  each planned `nn.Linear` is swapped for a `ViDiTQLinear` the moment its weight is read
  (`create_quantized_param`), so the full FP model never sits in memory;
- pre-quantized checkpoint (`config.json` carries the plan): the planned layers are built
  empty on the meta device before loading and the int codes / scales load into them as is.

Offload maps (a `device_map` with "cpu" / "disk" entries): diffusers hands the tensors of offloaded modules to
accelerate (a folder, or a CPU state dict) without asking the quantizer, so on the first path the planned layers
of those modules are quantized earlier, in the shard's state dict (`maybe_update_state_dict`): what is offloaded
are the layer's integer tensors, never its float weight. The layer's tensors are frozen parameters, which
accelerate's hooks load for each forward.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import missing_config_message, safetensors_metadata, tensor_headers, unknown_components
from .config import ViDiTQConfig, ViDiTQQuantMethod
from .device_maps import main_device, mapped_device, nested_map_problem, offloads
from .convert import (freeze_quantized_layers, own_aligned_memory, quantized_layer, recorded_plan_problems,
                      resolve_plan, set_submodule, stored_tensor_problems)
from .footprint import num_parameters
from .fuse_qkv import fused_layers, install as install_qkv_fusion
from .load_memory import HeapTrim, release_file_pages
from .timestep_clock import install_clock
from .hub import attach, detach
from .nn import ViDiTQLinear
from .plan import plan_to_json, validate_plan
from .single_file import register as register_single_file_layouts

SAFETENSORS_METADATA = {"viditq_format": "1", "viditq_weight_scale": "float32 bit patterns stored as int32"}
PLAN_METADATA_KEY = "viditq_plan"


def recorded_plan_layers(path: str) -> dict:
    """The plan entries (JSON) a weights file was saved with (its `viditq_plan` metadata); {} for files saved
    before it was recorded."""
    raw = safetensors_metadata(path).get(PLAN_METADATA_KEY)
    try:
        layers = {} if raw is None else json.loads(raw)
    except json.JSONDecodeError as e:
        layers = e
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: its '{PLAN_METADATA_KEY}' metadata is not a JSON object of plan entries; the file "
                         f"is corrupt or was edited. Re-download it or save the model again.")
    return layers


class Capabilities:
    """What both quantizers (diffusers' and transformers') declare: checkpoints save, adapters (LoRA) train through
    the quantized layers (their own weights stay frozen), and torch.compile traces them."""

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


class ViDiTQQuantizer(Capabilities, DiffusersQuantizer):
    requires_calibration = False
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: ViDiTQConfig, **kwargs):
        # from_pretrained always says whether the checkpoint is quantized; from_single_file does not (diffusers'
        # default is True) and loads original-layout floating-point files: quantize them as they load.
        kwargs.setdefault("pre_quantized", False)
        # The user's config object may be reused for another model: never write the plan into it.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)

    def update_torch_dtype(self, torch_dtype):
        # A checkpoint reloads in the dtype it was quantized in (its floating-point layers were
        # saved in it), unless the caller asks for another: the same outputs, bit for bit.
        # Without torch_dtype diffusers loads in torch's default dtype: named here, it becomes the model's
        # `config._pre_quantization_dtype` (diffusers records the dtype this returns), never None.
        plan = self.quantization_config.plan or {}
        if torch_dtype is None and self.pre_quantized and plan.get("dtype"):
            return getattr(torch, plan["dtype"])
        return torch.get_default_dtype() if torch_dtype is None else torch_dtype

    def validate_environment(self, *args, device_map=None, **kwargs):
        # called again with the resolved map ("auto" turned into a dict) before the weights load
        problem = nested_map_problem(device_map)
        if problem:
            raise ValueError(problem)
        self.device_map = device_map

    @property
    def plan_layers(self) -> dict:
        return (self.quantization_config.plan or {}).get("layers", {})

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized:
            config.plan = resolve_plan(model, config)
            self.model = model  # for maybe_update_state_dict, which diffusers does not pass it
            self.progress = tqdm(total=len(self.plan_layers), desc="Quantizing", unit="layer", disable=None)
            self.heap = HeapTrim()
            return model
        if config.plan is None:
            raise ValueError(
                "This checkpoint's quantization_config has no 'plan', so its quantized layout cannot be rebuilt. "
                "Re-save it with viditq_diffusers, or load the floating-point model with a ViDiTQConfig."
            )
        validate_plan(model, config.plan)
        for name, spec in self.plan_layers.items():
            dtype = model.get_submodule(name).weight.dtype
            set_submodule(model, name, ViDiTQLinear(spec, device="meta", dtype=dtype))
        return model

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        layer, _, leaf = param_name.rpartition(".")
        return (not self.pre_quantized and leaf == "weight" and layer in self.plan_layers
                and not isinstance(model.get_submodule(layer), ViDiTQLinear))  # not quantized in the state dict

    def maybe_update_state_dict(self, state_dict):
        """With an offload map, quantize the planned layers of offloaded ("cpu" / "disk") modules in the shard's
        state dict: diffusers writes those tensors to the offload folder (or a CPU state dict) as they are, so
        their float weights become the layer's integer tensors here, and an empty `ViDiTQLinear` on the meta
        device takes the layer's place. Each weight is quantized on the map's main device, where the model
        without offload would quantize it, so both give the same codes."""
        codes = [] if self.pre_quantized else [k for k in state_dict if k.endswith(".qweight")]
        if codes:  # from_single_file hands its whole file here first, before converting the keys
            raise ValueError(
                f"These weights are already ViDiT-Q quantized (they hold {codes[0]!r}), so they are no "
                f"floating-point file to quantize: a quantized model loads from its folder, whose config.json "
                f"holds the plan. Use <Model>.from_pretrained(folder) without quantization_config.")
        device_map = getattr(self, "device_map", None)
        if self.pre_quantized or not offloads(device_map):
            return state_dict
        for name in list(self.plan_layers):
            key = f"{name}.weight"
            if key not in state_dict or mapped_device(device_map, key) not in ("cpu", "disk"):
                continue
            old = self.model.get_submodule(name)
            weight = state_dict.pop(key).to(device=main_device(device_map), dtype=old.weight.dtype).contiguous()
            layer = quantized_layer(name, weight, None, self.plan_layers[name], self.quantization_config)
            self.plan_layers[name] = layer.spec
            state_dict.update({f"{name}.{leaf}": t.detach().cpu() for leaf, t in layer.state_dict().items()})
            empty = ViDiTQLinear(layer.spec, device="meta", dtype=old.weight.dtype)
            empty.bias = old.bias
            set_submodule(self.model, name, empty)
            self.progress.update()
        return state_dict

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict, unexpected_keys=None,
                               **kwargs):
        """Quantize one FP weight as it is read and swap its layer for a `ViDiTQLinear`."""
        name = param_name.rpartition(".")[0]
        old = model.get_submodule(name)
        weight = param_value.to(target_device)
        layer = quantized_layer(name, weight, None, self.plan_layers[name], self.quantization_config)
        # read once: neither its pages of the mapped checkpoint nor the freed temporaries need stay resident
        release_file_pages(param_value)
        self.heap.quantized(param_value)
        self.plan_layers[name] = layer.spec  # decided: config.json records what the weight decided
        layer.bias = old.bias  # loaded already, or still on meta and filled by the loader later
        set_submodule(model, name, layer)
        self.progress.update()

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        # Read every safetensors header up front: a truncated shard fails here with a clear message
        # instead of half-way through loading; then check the plan against the stored tensors.
        headers, recorded = {}, {}
        for path in checkpoint_files or []:
            if str(path).endswith(".safetensors"):
                headers.update(tensor_headers(str(path)))
                recorded.update(recorded_plan_layers(str(path)))
        codes = [k for k in loaded_keys if k.endswith(".qweight")]
        if not self.pre_quantized and codes:
            where = os.path.dirname(str(checkpoint_files[0])) if checkpoint_files else "the checkpoint"
            raise ValueError(missing_config_message(where, str(checkpoint_files[0]), f"tensor {codes[0]!r}",
                                                    quantizing=True))
        if self.pre_quantized and headers and any(f"{name}.qweight" in headers for name in self.plan_layers):
            problems = stored_tensor_problems(self.quantization_config.plan, headers)
            problems += recorded_plan_problems(self.quantization_config.plan, recorded) if recorded else []
            if problems:
                shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
                raise ValueError(
                    f"The plan in config.json does not match the weights saved with it ({len(problems)} problem(s)):\n"
                    f"  {shown}\nconfig.json was edited or belongs to other weights: restore the config.json saved "
                    f"with these weights (a plan cannot be changed after quantization; quantize the "
                    f"floating-point model with the new plan instead).")
        quantized_layers = {k.rpartition(".")[0] for k in loaded_keys if k.endswith(".qweight")}
        unplanned = sorted(quantized_layers - set(self.plan_layers))
        if self.pre_quantized and unplanned:
            raise ValueError(
                f"The checkpoint holds quantized tensors for {len(unplanned)} layer(s) that the plan in its "
                f"config.json does not list (e.g. {unplanned[0]!r}): config.json and the weights do not belong "
                f"together. Restore the config.json saved with these weights."
            )
        return loaded_keys

    def update_missing_keys(self, model, missing_keys, prefix):
        quantized = [k for k in missing_keys if k.rpartition(".")[0] in self.plan_layers]
        if self.pre_quantized and quantized:
            raise ValueError(
                f"The checkpoint lacks {len(quantized)} quantized tensor(s) that its plan needs "
                f"(e.g. {quantized[0]!r}). "
                f"It is probably a floating-point checkpoint whose config.json carries a ViDiT-Q plan: remove "
                f"'quantization_config' from config.json and pass quantization_config=ViDiTQConfig(...) instead."
            )
        return missing_keys

    def _process_model_after_weight_loading(self, model, **kwargs):
        if getattr(self, "progress", None) is not None:
            self.progress.close()
            self.heap.close()
        self.model = None  # the model holds this quantizer: no cycle
        leftovers = [name for name in self.plan_layers if not isinstance(model.get_submodule(name), ViDiTQLinear)]
        if leftovers:
            raise ValueError(
                f"{len(leftovers)} planned layer(s) got no weight from the checkpoint (e.g. {leftovers[0]!r}); "
                f"the checkpoint does not match the model config."
            )
        own_aligned_memory(model)
        freeze_quantized_layers(model)
        install_clock(model)
        install_qkv_fusion(model)  # fuse_qkv_projections() concatenates the projections' codes
        first = model.get_submodule(next(iter(self.plan_layers)))
        self.quantization_config.plan["dtype"] = str(first.weight.dtype).removeprefix("torch.")
        self.quantization_config.calibration = None  # the plan now holds what the statistics decided
        # the dtype the weights had (from_pretrained sets it again after this, to the dtype update_torch_dtype gave)
        model.register_to_config(quantization_config=self.quantization_config,
                                 _pre_quantization_dtype=first.weight.dtype)
        attach(model)
        model.num_parameters = functools.partial(num_parameters, model)  # quantized weights count as FP elements
        return model

    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        lora = [k for k in state_dict if ".base_layer." in k or ".lora_" in k]
        if lora:  # such a checkpoint would not reload: the plan knows no LoRA layers
            raise ValueError(f"LoRA layers are loaded (e.g. {lora[0]!r}); call unload_lora() first, or fuse_lora() "
                             f"then unload_lora() to save the LoRA baked into the quantized weights.")
        offloaded = [k for k, t in state_dict.items() if t.is_meta]
        if offloaded:  # diffusers would fail with "Cannot copy out of meta tensor"
            raise ValueError(f"{len(offloaded)} tensor(s) of this model are offloaded (e.g. {offloaded[0]!r} is on "
                             f"the meta device: the model was loaded with a device_map with 'cpu' or 'disk' entries, "
                             f"or has offload hooks), and save_pretrained needs them in memory. Load the model "
                             f"without a device_map (or with device_map={{'': 'cpu'}}) and save that.")
        # quantized layers outside the plan are fuse_qkv_projections()' fused copies of planned ones: not saved
        fused = {k.rpartition(".")[0] for k in state_dict if k.endswith(".qweight")} - set(self.plan_layers)
        state_dict = {k: v for k, v in state_dict.items() if k.rpartition(".")[0] not in fused}
        layers = plan_to_json(self.quantization_config.plan)["layers"]
        # the plan the tensors are written with, so a load can refuse a config.json edited afterwards
        return state_dict, {**SAFETENSORS_METADATA, PLAN_METADATA_KEY: json.dumps(layers, sort_keys=True)}

    def _dequantize(self, model):
        offloaded = [name for name in self.plan_layers if model.get_submodule(name).qweight.is_meta]
        if offloaded:  # before any layer changes: the float weights cannot be computed from tensors on disk
            raise ValueError(f"{len(offloaded)} quantized layer(s) are offloaded (e.g. {offloaded[0]!r}: its integer "
                             f"weights are on the meta device, loaded only for each forward by the device_map's "
                             f"hooks), so dequantize() cannot compute their float weights. Load the model without "
                             f"a device_map, dequantize() it, then offload the floating-point model.")
        fused = fused_layers(model)  # fuse_qkv_projections' layers: float too, as diffusers' own fused ones
        for name, spec in [*self.plan_layers.items(), *((n, m.spec) for n, m in fused.items())]:
            layer = model.get_submodule(name)
            linear = nn.Linear(spec.in_features, spec.out_features, spec.bias,
                               device=layer.qweight.device, dtype=layer.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(layer.dequantized_weight())
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            set_submodule(model, name, linear)
        # a plain FP model again: its config.json must not claim otherwise
        model._internal_dict = FrozenDict({k: v for k, v in model.config.items()
                                           if k not in ("quantization_config", "_pre_quantization_dtype")})
        detach(model)
        model.__dict__.pop("num_parameters", None)
        return model

    def adjust_target_dtype(self, torch_dtype):
        return torch.int8  # for device_map="auto" size estimates


def register() -> None:
    """Add ViDiT-Q to diffusers' quantizer registries (mutate the dicts, never rebind them)."""
    key = ViDiTQQuantMethod.VIDITQ.value
    diffusers_auto.AUTO_QUANTIZER_MAPPING[key] = ViDiTQQuantizer
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[key] = ViDiTQConfig
    refuse_unknown_components()
    register_single_file_layouts()


def refuse_unknown_components() -> None:
    """Make `components` naming no model of the pipeline an error in `DiffusionPipeline.from_pretrained` too.

    diffusers checks the names in one function, called before any component loads, that only logs a warning, so a
    typo (`components=["transformr"]`) would load a pipeline with nothing quantized. The function is wrapped: for a
    ViDiT-Q config it raises our error; every other config gets diffusers' own behaviour. Skipped where a diffusers
    version has no such function."""
    from diffusers.pipelines import pipeline_utils

    check = getattr(pipeline_utils, "_maybe_warn_for_wrong_component_in_quant_config", None)
    if check is None or getattr(check, "viditq_wrapped", False):
        return

    def check_components(init_dict, quant_config):
        problem = unknown_components(init_dict, quant_config, "this pipeline")
        if problem:
            raise ValueError(problem)
        return check(init_dict, quant_config)

    check_components.viditq_wrapped = True
    pipeline_utils._maybe_warn_for_wrong_component_in_quant_config = check_components
