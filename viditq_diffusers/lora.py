"""LoRA on ViDiT-Q layers through diffusers' and PEFT's own LoRA machinery.

diffusers loads a LoRA (`pipe.load_lora_weights`, `transformer.load_lora_adapter`) by building a PEFT
`LoraConfig` and calling `peft.inject_adapter_in_model`. For every targeted module PEFT's
`LoraModel._create_new_module` picks the LoRA layer class: first the config's custom modules
(`LoraConfig._register_custom_module`, PEFT's extension point for layer types it does not know), then its
built-in dispatchers (bitsandbytes, torchao, HQQ, ..., `nn.Linear`). A `ViDiTQLinear` matches none of the
built-in ones, so without this module PEFT refuses it ("Target module ViDiTQLinear(...) is not supported").

This module adds:

- `ViDiTQLoraLinear`: PEFT's LoRA layer for a `ViDiTQLinear` base layer. Its forward is the base layer's
  integer path plus, for each active adapter, `scaling * lora_B(lora_A(dropout(x)))` computed in floating
  point on the layer's *original* input `x` (smoothing and rotation happen inside the base layer only).
  Disabling, switching, re-weighting, deleting or unloading adapters never touches the base layer, so its
  output comes back bit for bit. `merge()` (diffusers' `fuse_lora`) re-quantizes
  `dequantized weight + delta` with the layer's own plan (bits, groups, symmetry, smoothing factors,
  rotation, early timestep-wise copy) and keeps the previous tensors, so `unmerge()` (`unfuse_lora`) restores
  them bit for bit.
- `dispatch_viditq`: a dispatcher with the signature of PEFT's own (`dispatch_bnb_8bit`, `dispatch_torchao`,
  ...): the LoRA layer for a `ViDiTQLinear` target, else None.
- `register_custom_module(config)`: PEFT's documented route for a `LoraConfig` you build yourself
  (`get_peft_model`, `inject_adapter_in_model`).
- `enable_peft_support()`: makes every `LoraConfig` PEFT injects (those diffusers builds from a LoRA file
  included) resolve `ViDiTQLinear` targets to `ViDiTQLoraLinear` through that same custom-module dispatch.
- `load_lora_file(model, path)`: loads a diffusers/PEFT-format LoRA file into a transformer whose diffusers
  class has no LoRA loader (PixArt, DiT, HunyuanDiT, Latte, Allegro in diffusers 0.42), quantized or not, with
  the same PEFT calls diffusers' `load_lora_adapter` makes. After it, PEFT's and diffusers' functions manage
  the adapters: `peft.functional.set_adapter`, `diffusers.utils.peft_utils.set_adapter_layers` (disable /
  enable), `set_weights_and_activate_adapters`, `delete_adapter_layers`, `recurse_remove_peft_layers`
  (unload), and each LoRA layer's `merge()` / `unmerge()` (fuse / unfuse).

Training: an unfused adapter trains through the quantized base layer (`transformer.add_adapter(LoraConfig(...))`,
or `inject_adapter_in_model(register_custom_module(config), model)` for classes without diffusers' PEFT mixin;
PEFT leaves only the LoRA factors trainable). The base layer's backward is the straight-through gradient of its
dequantized weight (`quant/straight_through.py`); its codes never change.

Supported: plain LoRA (any rank / alpha / rsLoRA, `lora_bias`, dropout), several adapters, per-adapter weights,
mixed-batch `adapter_names`. Refused with a message: DoRA and the other LoRA variants, and initialisations
that need the float base weight (PiSSA, OLoRA, LoftQ, CorDA, ...): apply those on the floating-point model.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
from torch import nn

try:
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as exc:  # peft is optional: only LoRA needs it
    raise ImportError(
        "LoRA on ViDiT-Q models needs PEFT (the backend diffusers loads LoRAs with): pip install 'peft>=0.21'"
    ) from exc

from .nn import ViDiTQLinear
from .quant.low_rank import add_low_rank

__all__ = [
    "ViDiTQLoraLinear", "dispatch_viditq", "register_custom_module", "enable_peft_support", "disable_peft_support",
    "load_lora_file",
]

# `init_lora_weights` values that only draw the LoRA factors (the others read the float base weight)
_PLAIN_INITS = (True, False, "gaussian")


class ViDiTQLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer around a `ViDiTQLinear` (built by PEFT through `dispatch_viditq`; never by hand)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        if getattr(config, "fan_in_fan_out", False):
            raise ValueError(
                "fan_in_fan_out=True is for transformers' Conv1D; a ViDiTQLinear is [out, in] like nn.Linear")
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        # the base layer's tensors as they were before the first merge (what `unmerge` puts back)
        self._premerge: Optional[dict[str, Any]] = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup would warn "Unsupported layer type"; a ViDiTQLinear states its shape
        return module.in_features, module.out_features

    # ------------------------------------------------------------------------------------------ adapters

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        where = f"layer '{kwargs.get('target_name') or '?'}' (ViDiTQLinear)"
        init = config.init_lora_weights
        if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
            raise ValueError(
                f"{where}: init_lora_weights={init!r} initialises the adapter from the float base weight, which a "
                f"quantized layer does not have. Create the adapter on the floating-point model (and save it), "
                f"then load it into the quantized one."
            )
        try:
            self.resolve_lora_variant(config=config)
        except ValueError as exc:
            raise ValueError(
                f"{where} supports plain LoRA only ({exc}). DoRA and the other LoRA variants need the float base "
                f"weight: apply them to the floating-point model, fuse them (fuse_lora), then quantize it."
            ) from exc
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            # PEFT would drop the LoRA factors while the fused codes still hold the delta: refuse
            raise ValueError(
                f"adapter '{adapter_name}' is fused into the quantized codes of this layer; call unfuse_lora() "
                f"before deleting it (or unload_lora_weights() to keep the fused codes and drop the LoRA layers)."
            )
        super().delete_adapter(adapter_name)

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)

        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # the integer path, balancing inside
        for active_adapter in self.active_adapters:
            # fused adapters are in the codes already; an active adapter that is not fused (after
            # `merge(adapter_names=[...])` of a subset) still runs as a branch, where PEFT's nn.Linear skips it
            if active_adapter not in self.lora_A or active_adapter in self.merged_adapters:
                continue
            lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
            dropout, scaling = self.lora_dropout[active_adapter], self.scaling[active_adapter]
            # the ORIGINAL input x, in the adapter's floating-point dtype
            down = lora_A(dropout(self._cast_input_dtype(x, lora_A.weight.dtype)))
            result = add_low_rank(result, down, lora_B.weight, lora_B.bias, scaling)
        return result

    # ------------------------------------------------------------------------------------------ merge

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`scaling * B @ A` as a float64 `[out, in]` tensor in the original input basis."""
        weight_A = self.lora_A[adapter].weight.double()
        weight_B = self.lora_B[adapter].weight.double()
        return (weight_B @ weight_A) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fuse adapters into the quantized codes: `Q_plan(dequantized weight + sum of deltas)`, once per call.

        The re-quantization uses the layer's own layout: bits, group size, symmetry, per-tensor scale, smoothing
        factors and rotation seed (the balancing is kept, not re-calibrated), and the early timestep-wise copy
        is re-quantized from its own codes. The tensors from before the first merge are kept, so `unmerge()`
        restores them bit for bit. Non-finite merged weights are always refused (`safe_merge` or not).
        """
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        name = self.kwargs.get("target_name") or ""
        delta = sum(self.get_delta_weight(a) for a in adapter_names)
        delta_bias = None
        bias_adapters = [a for a in adapter_names if self.lora_bias.get(a)]
        if bias_adapters:
            if base.bias is None:
                raise RuntimeError(
                    f"layer '{name}': cannot fuse a LoRA with lora_bias=True into a layer without bias; "
                    f"keep it unfused."
                )
            delta_bias = sum(self.lora_B[a].bias.double() * self.scaling[a] for a in bias_adapters)

        weights = {"": base.dequantized_weight(float64=True) + delta.to(base.qweight.device)}
        if base.early_weight_bits is not None:
            weights["early_"] = base.dequantized_weight(early=True, float64=True) + delta.to(base.qweight.device)
        for merged in weights.values():
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or Infs in the merged weight of layer '{name}': adapter(s) {adapter_names} seem broken; "
                    f"nothing was fused."
                )

        # references suffice: set_weight assigns new tensors, it never writes into the old ones
        snapshot = {**base._buffers, **base._parameters}
        for key in ("weight_zero", "early_weight_zero", "act_smooth", "bias"):  # None-valued plain attributes
            if hasattr(base, key):
                snapshot.setdefault(key, getattr(base, key))
        smoothing = None if base.smoothing() is None else base.smoothing().clone()
        try:
            early = None
            if "early_" in weights:
                # set_weight quantizes both copies from one weight: the early copy from its own codes first
                base.set_weight(weights["early_"], name, smoothing)
                early = {k: getattr(base, f"early_{k}") for k in ("qweight", "weight_scale", "weight_zero")}
            base.set_weight(weights[""], name, smoothing)
            if early is not None:
                for key, value in early.items():
                    setattr(base, f"early_{key}", value)
            base.weight = snapshot["weight"]  # set_weight sets it to the merged weight's dtype (float64)
            if delta_bias is not None:
                bias = base.bias
                base.bias = nn.Parameter((bias.double() + delta_bias.to(bias.device)).to(bias.dtype),
                                         requires_grad=bias.requires_grad)
        except Exception:
            self._restore(base, snapshot)
            raise
        if self._premerge is None:
            self._premerge = snapshot
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the base layer's tensors from before the first merge (bit for bit); all adapters unmerged."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._restore(self.get_base_layer(), self._premerge)
        self._premerge = None
        self.merged_adapters.clear()

    @staticmethod
    def _restore(base: ViDiTQLinear, snapshot: dict[str, Any]) -> None:
        for key, old in snapshot.items():
            current = getattr(base, key, None)
            if isinstance(old, torch.Tensor) and isinstance(current, torch.Tensor):
                # follow a `.to(device)` / floating `.to(dtype)` applied to the model while it was fused
                dtype = current.dtype if old.is_floating_point() and current.is_floating_point() else old.dtype
                if (old.device, old.dtype) != (current.device, dtype):
                    moved = old.to(device=current.device, dtype=dtype)
                    if isinstance(old, nn.Parameter):
                        moved = nn.Parameter(moved, requires_grad=old.requires_grad)
                    old = moved
            setattr(base, key, old)

    @property
    def weight(self) -> torch.Tensor:
        # PEFT's default returns `qweight` (int codes) for layers that have one; diffusers code reads
        # `layer.weight.dtype` / `.device` as the compute dtype, which the base layer's empty `weight` keeps.
        return self.get_base_layer().weight

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ---------------------------------------------------------------------------------------------- PEFT hooks


def dispatch_viditq(target: nn.Module, adapter_name: str, config, **kwargs: Any) -> Optional[nn.Module]:
    """PEFT-style dispatcher: a `ViDiTQLoraLinear` when `target` (or the layer it wraps) is a `ViDiTQLinear`."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, ViDiTQLinear):
        return ViDiTQLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def register_custom_module(config):
    """Register `ViDiTQLinear -> ViDiTQLoraLinear` on a `LoraConfig` you build yourself (PEFT's custom-module
    dispatch). A mapping for `ViDiTQLinear` already on the config is left as it is. Returns the config."""
    if ViDiTQLinear not in (getattr(config, "_custom_modules", None) or {}):
        config._register_custom_module({ViDiTQLinear: ViDiTQLoraLinear})
    return config


def load_lora_file(model: nn.Module, path: str, adapter_name: str = "default", prefix: Optional[str] = "transformer",
                   weight_name: str = "pytorch_lora_weights.safetensors"):
    """Load a diffusers/PEFT-format LoRA safetensors file into `model` as adapter `adapter_name`; returns its
    `LoraConfig`. For transformers without diffusers' `load_lora_adapter` (PixArt, ...); others have their own.

    `path` is the file or its folder (`weight_name` in it). Keys are `<prefix>.<module>.lora_A.weight` /
    `.lora_B.weight` (`prefix=None`: no prefix, as `save_lora_adapter` writes). The `LoraConfig` is the file's
    `lora_adapter_metadata` when present, else inferred from the tensors as diffusers does (rank from `lora_B`,
    alpha = rank). Injection and loading are PEFT's `inject_adapter_in_model` and `set_peft_model_state_dict`,
    with `ViDiTQLinear -> ViDiTQLoraLinear` registered on the config. Raises if the file has no LoRA tensors
    for `prefix`, if a tensor matches no layer of `model` (PEFT would skip it silently) or if the name is taken.
    """
    import json
    import os

    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    file = os.path.join(path, weight_name) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no LoRA file at {file!r}")
    with safe_open(file, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw_config = (f.metadata() or {}).get("lora_adapter_metadata")
    lead = f"{prefix}." if prefix else ""
    state = {k[len(lead):]: v for k, v in tensors.items() if k.startswith(lead)}
    if not any(".lora_A." in k for k in state):
        raise ValueError(f"{file!r} has no LoRA tensors in the diffusers/PEFT format ('{lead}<module>.lora_A.weight'); "
                         f"keys look like {sorted(tensors)[:3]}. Convert it with diffusers first (other LoRA "
                         f"formats are converted by the pipelines' load_lora_weights).")
    # the layers say what is loaded (`model.peft_config` outlives `recurse_remove_peft_layers`)
    if any(adapter_name in getattr(m, "lora_A", {}) for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise ValueError(f"adapter name '{adapter_name}' is already loaded in this model; pick another one.")

    if raw_config:
        kwargs = {k[len(lead):]: v for k, v in json.loads(raw_config).items() if k.startswith(lead)}
    else:
        ranks = {f"^{k}": v.shape[1] for k, v in state.items() if ".lora_B." in k and v.ndim > 1}
        kwargs = get_peft_kwargs(ranks, None, state)
    config = register_custom_module(LoraConfig(**kwargs))
    try:
        inject_adapter_in_model(config, model, adapter_name=adapter_name, state_dict=state)
        result = set_peft_model_state_dict(model, state, adapter_name)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        if unexpected:
            raise ValueError(f"{len(unexpected)} LoRA tensors of {file!r} match no layer of {type(model).__name__} "
                             f"(e.g. {unexpected[0]!r}): is it a LoRA for this model?")
    except Exception:
        # as diffusers' loader does: no half-loaded adapter stays behind
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {}):
                module.delete_adapter(adapter_name)
        (getattr(model, "peft_config", None) or {}).pop(adapter_name, None)
        raise
    return config


def _is_patched(function) -> bool:
    return getattr(function, "_viditq_original", None) is not None


def enable_peft_support() -> None:
    """Make PEFT resolve `ViDiTQLinear` targets to `ViDiTQLoraLinear` for every LoRA it injects.

    diffusers builds the `LoraConfig` itself inside `load_lora_adapter`, so there is no config to register the
    custom module on beforehand. This wraps `peft.tuners.lora.model.LoraModel._create_new_module` (the one
    place every LoRA injection picks its layer class) so that it first registers the mapping on the config
    being injected (`register_custom_module`) and then runs PEFT's own dispatch unchanged. Idempotent; only
    `ViDiTQLinear` targets are affected. `disable_peft_support()` undoes it.
    """
    from peft.tuners.lora.model import LoraModel

    original = LoraModel.__dict__["_create_new_module"].__func__
    if _is_patched(original):
        return

    @functools.wraps(original)
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, ViDiTQLinear):
            register_custom_module(lora_config)
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._viditq_original = original
    LoraModel._create_new_module = staticmethod(_create_new_module)
    _patch_flux_module_shape()


def _patch_flux_module_shape() -> None:
    """`FluxPipeline.load_lora_weights` compares each targeted layer's `weight.shape` with the LoRA's (to expand
    layers for Flux Control LoRAs) through `FluxLoraLoaderMixin._calculate_module_shape`, which knows the
    bitsandbytes and GGUF weight classes. A `ViDiTQLinear`'s `weight` is an empty compute-dtype tensor, so it
    would fail with an IndexError: answer `(out_features, in_features)` for it, defer to diffusers otherwise."""
    try:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    except ImportError:
        return
    original = FluxLoraLoaderMixin.__dict__.get("_calculate_module_shape")
    if original is None or _is_patched(original.__func__):
        return
    original = original.__func__

    @functools.wraps(original)
    def _calculate_module_shape(model, base_module=None, base_weight_param_name=None):
        module = base_module
        if module is None and isinstance(base_weight_param_name, str) and base_weight_param_name.endswith(".weight"):
            try:
                module = model.get_submodule(base_weight_param_name.rsplit(".weight", 1)[0])
            except AttributeError:
                module = None
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if isinstance(module, ViDiTQLinear):
            return torch.Size((module.out_features, module.in_features))
        return original(model=model, base_module=base_module, base_weight_param_name=base_weight_param_name)

    _calculate_module_shape._viditq_original = original
    FluxLoraLoaderMixin._calculate_module_shape = staticmethod(_calculate_module_shape)


def disable_peft_support() -> None:
    """Undo `enable_peft_support()` (PEFT refuses `ViDiTQLinear` targets again)."""
    from peft.tuners.lora.model import LoraModel

    current = LoraModel.__dict__["_create_new_module"].__func__
    if _is_patched(current):
        LoraModel._create_new_module = staticmethod(current._viditq_original)
    try:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    except ImportError:
        return
    current = FluxLoraLoaderMixin.__dict__.get("_calculate_module_shape")
    if current is not None and _is_patched(current.__func__):
        FluxLoraLoaderMixin._calculate_module_shape = staticmethod(current.__func__._viditq_original)
