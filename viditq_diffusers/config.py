"""`ViDiTQConfig`: what to quantize and how. Plain, JSON-safe data.

It is both a diffusers model quantization config (`quant_method="viditq"`) and a
pipeline quantization config, so the same object goes to
`<Model>.from_pretrained(..., quantization_config=...)` and
`DiffusionPipeline.from_pretrained(..., quantization_config=...)`.
"""

from __future__ import annotations

import copy
import json
from enum import Enum

from diffusers import PipelineQuantizationConfig
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from .quant.formats import check_bits


class ViDiTQQuantMethod(str, Enum):
    VIDITQ = "viditq"


# A preset fills defaults; explicit constructor arguments override them.
PRESETS: dict[str, dict] = {
    "w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None},
    "w4a8": {"weight_bits": 4, "act_bits": 8, "group_size": None},
    "w8a16": {"weight_bits": 8, "act_bits": 16, "group_size": None},
    "w4a16": {"weight_bits": 4, "act_bits": 16, "group_size": None},
    # Baseline, not ViDiT-Q: per-tensor weights, static per-tensor activations from calibration.
    "naive_w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None, "per_tensor": True, "static_acts": True},
}


class ViDiTQConfig(QuantizationConfigMixin, PipelineQuantizationConfig):
    """ViDiT-Q quantization settings.

    Args:
        preset: one of `PRESETS` ("w8a8", "w4a8", "w8a16", "w4a16").
        weight_bits: 4 or 8; overrides the preset.
        act_bits: 8 (dynamic per-token integer activations) or 16 (weight-only); overrides the preset.
        group_size: input channels per weight scale; None = one scale per output channel.
        modules_to_not_convert: extra layer names (or prefixes, or fnmatch patterns) to keep in
            floating point, on top of the per-architecture defaults.
        components: pipeline components to quantize when used with `DiffusionPipeline.from_pretrained`.
        calibration: `{layer name: input absmax}` for presets with static activation scales
            (`naive_w8a8`); see `viditq_diffusers.calibration.input_absmax`. None otherwise.
        plan: a full per-layer plan (`QuantPlan` dict). When given it decides every layer and the
            bit/group arguments are only defaults for the summary.
        weight_symmetric: symmetric weights (no zero point). Default False: asymmetric min-max,
            as in the ViDiT-Q reference.
    """

    def __init__(
        self,
        preset: str = "w8a8",
        weight_bits: int | None = None,
        act_bits: int | None = None,
        group_size: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        components=("transformer",),
        calibration=None,
        plan: dict | None = None,
        weight_symmetric: bool | None = None,
        quant_method: str = ViDiTQQuantMethod.VIDITQ,
    ):
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}. Choose one of: {', '.join(PRESETS)}.")
        if ViDiTQQuantMethod(quant_method) is not ViDiTQQuantMethod.VIDITQ:  # pragma: no cover - enum has one value
            raise ValueError(f"quant_method must be 'viditq', got {quant_method!r}")
        defaults = PRESETS[preset]
        self.quant_method = ViDiTQQuantMethod.VIDITQ
        self.preset = preset
        self.weight_bits = int(defaults["weight_bits"] if weight_bits is None else weight_bits)
        self.act_bits = int(defaults["act_bits"] if act_bits is None else act_bits)
        self.group_size = defaults["group_size"] if group_size is None else int(group_size)
        self.weight_symmetric = bool(weight_symmetric) if weight_symmetric is not None else False
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.components = [components] if isinstance(components, str) else list(components)
        self.calibration = calibration
        self.plan = copy.deepcopy(plan)
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits != 16:
            check_bits(self.act_bits, "act_bits")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be a positive divisor of in_features or None, got {self.group_size}.")
        if self.static_acts and not isinstance(calibration, dict):
            raise ValueError(
                f"preset {preset!r} uses static activation scales: pass calibration={{layer name: input absmax}}, "
                f"e.g. from viditq_diffusers.calibration.input_absmax(model, run)."
            )
        if calibration is not None and not self.static_acts:
            raise ValueError(
                f"preset {preset!r} quantizes activations dynamically and uses no calibration; pass calibration=None."
            )
        json.dumps(self.to_dict())  # fail early on anything that would not survive config.json

    # -- diffusers' QuantizationConfigMixin conventions ------------------------------------
    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __eq__(self, other) -> bool:
        return isinstance(other, ViDiTQConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ViDiTQConfig({json.dumps(self.to_dict(), sort_keys=True)})"

    @property
    def per_tensor(self) -> bool:
        """One weight scale per tensor (the naive baseline), from the preset."""
        return PRESETS[self.preset].get("per_tensor", False)

    @property
    def static_acts(self) -> bool:
        """Static per-tensor activation scales from calibration (the naive baseline), from the preset."""
        return PRESETS[self.preset].get("static_acts", False)

    @property
    def label(self) -> str:
        group = f"-g{self.group_size}" if self.group_size else ""
        return f"W{self.weight_bits}A{self.act_bits}{group}"

    # -- diffusers' PipelineQuantizationConfig conventions ---------------------------------
    # (properties, so they stay out of `to_dict()` and config.json)
    @property
    def components_to_quantize(self) -> list[str]:
        return self.components

    @property
    def quant_mapping(self):
        return None

    @property
    def is_granular(self) -> bool:
        return False

    @property
    def config_mapping(self) -> dict:
        return {}

    def _resolve_quant_config(self, is_diffusers: bool = True, module_name: str | None = None):
        """Per pipeline component: a copy of this config for the denoiser(s), None for the rest."""
        if module_name not in self.components:
            return None
        if not is_diffusers:
            raise ValueError(
                f"component {module_name!r} is not a diffusers model; ViDiT-Q quantizes diffusion transformers. "
                f"Remove it from components={self.components}."
            )
        return copy.deepcopy(self)
