"""`ViDiTQConfig`: what to quantize and how. Plain, JSON-safe data.

It is both a diffusers model quantization config (`quant_method="viditq"`) and a
pipeline quantization config, so the same object goes to
`<Model>.from_pretrained(..., quantization_config=...)` and
`DiffusionPipeline.from_pretrained(..., quantization_config=...)`. Where transformers is installed it is a
transformers quantization config too (text encoders: `transformers_quantizer.py`).
"""

from __future__ import annotations

import copy
import json
import os
from enum import Enum

from diffusers import PipelineQuantizationConfig
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

try:  # transformers' registry accepts only subclasses of its own mixin; diffusers' methods come first in the MRO
    from transformers.utils.quantization_config import QuantizationConfigMixin as TransformersConfigMixin
except ImportError:  # transformers is optional (text encoders only)
    TransformersConfigMixin = object

from .checks import MAX_SEED, boolean, integer, name_list, real, shown
from .layer_spec import precision_label
from .plan import plan_from_json, plan_to_json, read_plan
from .text_encoders import TEXT_ENCODER_PRESET


def bits_argument(value, argument: str, default, allowed: tuple) -> int:
    """A bit width from the caller, or the preset's `default` when the caller gave None."""
    if value is None:
        return default
    fix = "ViDiT-Q quantizes to 4 or 8 bits" + (" (16 keeps activations in floating point)" if 16 in allowed else "")
    return integer(value, f"ViDiTQConfig: {argument}", allowed=allowed, fix=f"{fix}, e.g. {argument}=8")


def calibration_argument(value):
    """Statistics (`CalibrationStats`), the path of a statistics file (as a str), `{layer: input absmax}` for the
    naive baseline, or None."""
    from .calibration import CalibrationStats

    if value is None or isinstance(value, CalibrationStats):
        return value
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, dict):
        for name, absmax in value.items():
            if not isinstance(name, str):
                raise TypeError(f"ViDiTQConfig: calibration={{layer: absmax}} takes layer names as keys, got "
                                f"{shown(name)}.")
            real(absmax, f"ViDiTQConfig: calibration[{name!r}]", minimum=0,
                 fix="pass each layer's largest |input| (viditq_diffusers.calibration.input_absmax)")
        return dict(value)
    raise TypeError(f"ViDiTQConfig: calibration must be CalibrationStats (viditq_diffusers.calibrate), the path of "
                    f"a statistics file, {{layer: input absmax}} or None, got {type(value).__name__}.")


def plan_argument(value) -> dict:
    """A plan dict (entries as JSON or `LayerSpec`s) or the path of a plan file, checked field by field."""
    if isinstance(value, (str, os.PathLike)):
        return read_plan(value)
    if not isinstance(value, dict):
        raise TypeError(f"ViDiTQConfig: plan must be a plan dict or the path of a plan JSON file, got "
                        f"{type(value).__name__}.")
    return plan_from_json(value)


class ViDiTQQuantMethod(str, Enum):
    VIDITQ = "viditq"


# A preset fills defaults; explicit constructor arguments override them. "balance" absent = the per-layer
# recipe search ("search") when calibration statistics are given, none otherwise.
PRESETS: dict[str, dict] = {
    "w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None},
    "w4a8": {"weight_bits": 4, "act_bits": 8, "group_size": None},
    "w8a16": {"weight_bits": 8, "act_bits": 16, "group_size": None, "balance": None},
    "w4a16": {"weight_bits": 4, "act_bits": 16, "group_size": None, "balance": None},
    # the paper's reference mixed precision: W8 FFNs and first / last blocks, W4 attention (reference_mixed_precision)
    "w4a8_mp": {"weight_bits": 4, "act_bits": 8, "group_size": None, "mixed": "reference"},
    # Baselines and ablations, not ViDiT-Q:
    # per-tensor weights, static per-tensor activations from calibration;
    "naive_w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None, "per_tensor": True, "static_acts": True,
                   "balance": None},
    # SmoothQuant: smoothing with its alpha 0.5 (= ViDiT-Q alpha 0.5), then static per-tensor activations;
    "smoothquant_w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None, "static_acts": True,
                         "balance": "smooth", "alpha": 0.5},
    # one half of the balancing each (QuaRot-like rotation needs no statistics).
    "rotate_w4a8": {"weight_bits": 4, "act_bits": 8, "group_size": None, "balance": "rotate"},
    "smooth_w4a8": {"weight_bits": 4, "act_bits": 8, "group_size": None, "balance": "smooth"},
    "rotate_w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None, "balance": "rotate"},
    "smooth_w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None, "balance": "smooth"},
    # the paper's fixed recipe: smoothing then rotation on every layer
    "paper_w8a8": {"weight_bits": 8, "act_bits": 8, "group_size": None, "balance": "smooth_rotate"},
    "paper_w4a8": {"weight_bits": 4, "act_bits": 8, "group_size": None, "balance": "smooth_rotate"},
}
BALANCES = (None, "smooth", "rotate", "smooth_rotate", "search")
DENOISER_PRESET = "w8a8"  # `preset=None` on a diffusers denoiser (a text encoder: TEXT_ENCODER_PRESET)


class ViDiTQConfig(QuantizationConfigMixin, PipelineQuantizationConfig, TransformersConfigMixin):
    """ViDiT-Q quantization settings.

    Args:
        preset: one of `PRESETS` ("w8a8", "w4a8", "w8a16", "w4a16", "w4a8_mp": the paper's reference
            mixed precision, W8 for FFN linears and the first and last blocks, W4 attention), or None (default):
            the model's default, "w8a8" for a diffusers denoiser and weight-only "w8a16" for a transformers text
            encoder (`text_encoders.py`). The config reads as "w8a8" (`preset`, `to_dict()`, equality, repr); a
            text encoder's quantizer swaps it for "w8a16" (`for_text_encoder`), which is what its config.json
            records. Giving weight_bits, act_bits, calibration, balance or a plan chooses the precision: the
            config is then "w8a8" with those overrides for every model.
        weight_bits: 4 or 8; overrides the preset.
        act_bits: 8 (dynamic per-token integer activations) or 16 (weight-only); overrides the preset.
        group_size: input channels per weight scale; None = one scale per output channel.
        modules_to_not_convert: extra layers to keep in floating point, on top of the per-architecture
            defaults, matched as diffusers' other backends match them: an entry names a layer's leaf ("to_k": every
            attention's to_k), a dotted component or run of components ("proj_out" also keeps
            "single_transformer_blocks.0.proj_out"; "transformer_blocks.0" keeps that block's layers), the full
            name, or is an fnmatch pattern ("transformer_blocks.*.ff.*"). Components match whole
            ("transformer_blocks.0" is not "single_transformer_blocks.0"). An entry that matches no module warns.
        components: pipeline components to quantize when used with `DiffusionPipeline.from_pretrained`: the
            denoiser(s) with this config, a transformers text encoder ("text_encoder", ...) with weight-only W8A16
            (for another encoder preset, diffusers' `PipelineQuantizationConfig(quant_mapping=...)`).
        calibration: activation statistics: a `CalibrationStats` from `viditq_diffusers.calibrate` (or the
            path of one saved with `.save`), needed by smoothing and static activation scales; the naive
            baseline also takes `{layer name: input absmax}` (`calibration.input_absmax`).
        balance: static-dynamic channel balancing of the A8 layers: "search" (per layer, the recipe among
            smoothing on/off x rotation on/off with the smallest output error on the calibration tokens),
            "smooth_rotate" (the paper's fixed recipe), "smooth", "rotate" or None. Default: the preset's,
            else "search" when `calibration` is given.
        alpha: smoothing exponent in ViDiT-Q's convention (`m_j = w_j^alpha / a_j^(1-alpha)`, i.e. 1 minus
            SmoothQuant's alpha), or "auto": searched per layer to minimise its output error on the
            calibration tokens.
        rotation_seed: seeds the random Hadamard rotations (layer i uses `rotation_seed + i`).
        plan: a full per-layer plan (a dict, see `viditq_diffusers.plan`), or the path of one saved as JSON (e.g. by
            `viditq search`). When given it decides every layer and the bit/group arguments are only
            defaults for the summary.
        early_weight_bits: timestep-wise precision: every quantized layer also stores its weight at these bits
            and uses that copy while the model's timestep input is >= `early_timestep` (diffusers'
            schedulers count down from ~1000, so 750 = roughly the first quarter of the steps). Both
            copies are stored. None (default): one precision for all steps.
        early_timestep: see `early_weight_bits`.
        weight_symmetric: symmetric weights (no zero point). Default False: asymmetric min-max,
            as in the ViDiT-Q reference.
    """

    def __init__(
        self,
        preset: str | None = None,
        weight_bits: int | None = None,
        act_bits: int | None = None,
        group_size: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        components=("transformer",),
        calibration=None,
        plan: dict | None = None,
        weight_symmetric: bool | None = None,
        balance: str | None = "preset",
        alpha: float | str | None = None,
        rotation_seed: int = 0,
        early_weight_bits: int | None = None,
        early_timestep: float = 750.0,
        quant_method: str = ViDiTQQuantMethod.VIDITQ,
    ):
        # no precision chosen: the model's default (W8A8 here; a text encoder's quantizer makes it W8A16)
        self._model_default = preset is None and weight_bits is None and act_bits is None and plan is None \
            and calibration is None and balance == "preset"
        preset = DENOISER_PRESET if preset is None else preset
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}. Choose one of: {', '.join(PRESETS)}.")
        if quant_method != ViDiTQQuantMethod.VIDITQ:
            raise ValueError(f"ViDiTQConfig: quant_method must be 'viditq', got {shown(quant_method)}; leave it out.")
        defaults = PRESETS[preset]
        self.quant_method = ViDiTQQuantMethod.VIDITQ
        self.preset = preset
        self.weight_bits = bits_argument(weight_bits, "weight_bits", defaults["weight_bits"], (4, 8))
        self.act_bits = bits_argument(act_bits, "act_bits", defaults["act_bits"], (4, 8, 16))
        self.group_size = defaults["group_size"] if group_size is None else integer(
            group_size, "ViDiTQConfig: group_size", minimum=1,
            fix="pass a positive divisor of every quantized layer's in_features (e.g. 64), or None for one scale "
                "per output channel")
        self.weight_symmetric = False if weight_symmetric is None else boolean(
            weight_symmetric, "ViDiTQConfig: weight_symmetric", "pass weight_symmetric=True or False")
        self.modules_to_not_convert = name_list(
            [] if modules_to_not_convert is None else modules_to_not_convert, "modules_to_not_convert", "proj_out")
        self.components = name_list(components, "components", "transformer")
        if not self.components:
            raise ValueError("ViDiTQConfig: components is empty, so a pipeline would load without any quantized "
                             "component; pass components=['transformer'] (the default).")
        self.calibration = calibration_argument(calibration)
        # in memory the plan's entries are LayerSpecs (frozen, so a shallow copy of the dicts is a copy)
        self.plan = None if plan is None else plan_argument(plan)
        if balance == "preset":
            balance = defaults.get("balance", "search" if calibration is not None else None)
        if not (balance is None or isinstance(balance, str)) or balance not in BALANCES:
            raise ValueError(f"ViDiTQConfig: balance must be one of {BALANCES}, got {shown(balance)}.")
        self.balance = balance if self.act_bits < 16 else None
        if self.balance == "search" and self.static_acts:
            raise ValueError(f"balance='search' chooses recipes for dynamic per-token activations; preset {preset!r} "
                             f"uses static activation scales: pass balance=None or 'smooth'.")
        alpha = defaults.get("alpha", "auto") if alpha is None else alpha
        if not (isinstance(alpha, str) and alpha == "auto"):
            alpha = real(alpha, "ViDiTQConfig: alpha", minimum=0, maximum=1,
                         fix="pass a smoothing exponent in [0, 1] (ViDiT-Q convention) or alpha='auto'")
        self.alpha = alpha
        self.rotation_seed = integer(rotation_seed, "ViDiTQConfig: rotation_seed", minimum=0, maximum=MAX_SEED,
                                     fix="pass a non-negative whole number, e.g. rotation_seed=0")
        self.early_weight_bits = None if early_weight_bits is None else bits_argument(
            early_weight_bits, "early_weight_bits", None, (4, 8))
        self.early_timestep = real(early_timestep, "ViDiTQConfig: early_timestep",
                                   fix="pass the timestep from which on early_weight_bits apply, e.g. 750")
        if self.plan is None and self.needs_calibration and calibration is None:
            raise ValueError(
                f"preset {preset!r} (balance={self.balance!r}) needs activation statistics: calibrate first, "
                f"stats = viditq_diffusers.calibrate(pipe, prompts) or `viditq calibrate PIPE --prompts FILE "
                f"--out stats.safetensors`, then pass calibration=stats (or its path)."
            )
        if calibration is not None and not self.needs_calibration:
            raise ValueError(
                f"preset {preset!r} with balance={self.balance!r} uses no calibration statistics; pass "
                f"calibration=None (or balance='search' to use them)."
            )
        if isinstance(calibration, dict) and not self.static_acts:
            raise ValueError(
                f"calibration={{layer: absmax}} only serves static per-tensor activation scales (naive_w8a8); "
                f"preset {preset!r} with balance={self.balance!r} needs per-channel CalibrationStats from "
                f"viditq_diffusers.calibrate, or calibration=None."
            )
        json.dumps(self.to_dict())  # fail early on anything that would not survive config.json

    # -- diffusers' QuantizationConfigMixin conventions ------------------------------------
    def to_dict(self) -> dict:
        # In-memory statistics are not config data: once quantized, the plan holds what they decided. Private
        # attributes (`_model_default`) are not config data either.
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "calibration" and not k.startswith("_")}
        out["calibration"] = self.calibration if isinstance(self.calibration, (str, dict, type(None))) else None
        if self.plan is not None:
            out["plan"] = plan_to_json(self.plan)
        return out

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __deepcopy__(self, memo):
        # Calibration statistics are read-only and may be large: copies share them.
        new = copy.copy(self)
        new.__dict__ = {k: v if k == "calibration" else copy.deepcopy(v, memo) for k, v in self.__dict__.items()}
        return new

    def __eq__(self, other) -> bool:
        return isinstance(other, ViDiTQConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ViDiTQConfig({json.dumps(self.to_dict(), sort_keys=True)})"

    def for_text_encoder(self) -> ViDiTQConfig:
        """The config a transformers text encoder is quantized with: this one, except that a config whose
        precision was left to the model's default (`preset=None` and no precision argument) becomes weight-only
        "w8a16" (`text_encoders.TEXT_ENCODER_PRESET`), its other settings kept."""
        if not self._model_default:
            return self
        return ViDiTQConfig(**{**self.to_dict(), "preset": TEXT_ENCODER_PRESET, "weight_bits": None, "act_bits": None,
                               "balance": "preset"})

    @property
    def per_tensor(self) -> bool:
        """One weight scale per tensor (the naive baseline), from the preset."""
        return PRESETS[self.preset].get("per_tensor", False)

    @property
    def static_acts(self) -> bool:
        """Static per-tensor activation scales from calibration (the naive baseline), from the preset."""
        return PRESETS[self.preset].get("static_acts", False)

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales or smoothing need activation statistics; rotation alone does not."""
        return self.static_acts or self.balance in ("smooth", "smooth_rotate", "search")

    @property
    def mixed(self) -> str | None:
        """The preset's mixed-precision rule ("reference": the paper's W4A8-MP heuristic), or None."""
        return PRESETS[self.preset].get("mixed")

    @property
    def label(self) -> str:
        return precision_label(self.weight_bits, self.act_bits, self.group_size) + ("-MP" if self.mixed else "")

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
        """Per pipeline component: a copy of this config for the denoiser(s); for a text encoder (a transformers
        model) named in `components`, the encoders' own default, weight-only W8A16 (`text_encoders.py`: another
        encoder preset goes through diffusers' `PipelineQuantizationConfig(quant_mapping=...)`); None for the rest."""
        if module_name not in self.components:
            return None
        if not is_diffusers:
            return ViDiTQConfig(TEXT_ENCODER_PRESET)
        return copy.deepcopy(self)
