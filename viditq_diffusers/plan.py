"""The plan: per-layer decisions (`LayerSpec`), as plain JSON data on disk.

A plan is a dict written into `config.json` (`quantization_config["plan"]`), so a saved
checkpoint rebuilds its exact layout before any weight is read:

    {"version": 1, "model_class": "PixArtTransformer2DModel",
     "layers": {"transformer_blocks.0.attn1.to_q": {
         "weight_bits": 8, "act_bits": 8, "group_size": null, "symmetric": false,
         "method": "minmax", "in_features": 1152, "out_features": 1152, "bias": true}}}

In memory the `"layers"` values are `LayerSpec`s (`layer_spec.py`; `plan_from_json` / `plan_to_json` convert
at the JSON boundary: config.json, plan files, the ComfyUI file's metadata). Layers absent from `layers` stay in
floating point. After quantization the plan also records `"dtype"`, the compute dtype the model was
quantized in, so a reload without `torch_dtype` gets the same floating-point layers back. New per-layer
fields are added as new keys with a version bump; a reader refuses keys it does not know rather than
ignoring them.

Glossary (one name per concept):
- plan entry / `LayerSpec` / `spec`: one layer's decisions (`layer_spec.py`; no "layout", no "config");
- `smooth_alpha`: the smoothing exponent of a layer (plan key); "auto" / "search" in a plan that is not
  decided yet (`LayerSpec.decided`), a number or None once the layer's weight was seen;
- `smoothing`: the smoothing factors `m` (fp32 `[in]`) computed from `smooth_alpha`, the calibration
  statistics and the weight; stored in a checkpoint as the `act_smooth` tensor;
- channel balancing = smoothing then rotation (`rotation_seed`); `quant/channel_balance.py` is its math,
  `recipe.py` decides each layer's recipe when its weight is read, `kernels/cpu_balance.py` rotates in C++.
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from dataclasses import replace

import torch
from torch import nn

from .architectures import is_quantized_by_default, is_weight_only_by_default
from .checks import shown
from .jsonio import read_json
from .layer_spec import LayerSpec
from .quant.formats import qrange
from .quant.hadamard import check_order, rotatable

PLAN_VERSION = 1


PLAN_KEYS = {"version", "layers", "model_class", "dtype"}
PLAN_DTYPES = ("float32", "float16", "bfloat16", "float64")  # `dtype`: the compute dtype the model was quantized in


def plan_from_json(plan: dict) -> dict:
    """A plan read from JSON, its `"layers"` entries as `LayerSpec`s (entries that are already specs are kept).
    A ValueError (TypeError for a wrong type) names what does not fit this version's format."""
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), dict):
        raise ValueError(f"plan must be a JSON object with a 'layers' mapping (see viditq_diffusers.plan), got "
                         f"{shown(plan) if not isinstance(plan, dict) else 'keys ' + str(sorted(map(str, plan)))}.")
    if plan.get("version") != PLAN_VERSION or isinstance(plan.get("version"), bool):
        raise ValueError(
            f"plan version {plan.get('version')!r} is not supported by this viditq_diffusers (reads version "
            f"{PLAN_VERSION}); upgrade viditq-diffusers or re-quantize the model."
        )
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise ValueError(f"plan has unknown keys {sorted(map(str, unknown))} (known: {sorted(PLAN_KEYS)}); it was "
                         f"written by another version of viditq-diffusers, or edited by hand.")
    if plan.get("model_class") is not None and not isinstance(plan["model_class"], str):
        raise TypeError(f"plan 'model_class' must be a class name (a string), got {shown(plan['model_class'])}.")
    if plan.get("dtype") is not None and plan["dtype"] not in PLAN_DTYPES:
        raise ValueError(f"plan 'dtype' must be one of {PLAN_DTYPES}, got {shown(plan['dtype'])}.")
    bad = [name for name in plan["layers"] if not isinstance(name, str) or not name]
    if bad:
        raise TypeError(f"plan 'layers' keys must be layer names, got {bad[0]!r}.")
    return {**plan, "layers": {name: LayerSpec.from_json(spec, name) for name, spec in plan["layers"].items()}}


def read_plan(path: str | os.PathLike) -> dict:
    """A plan JSON file (e.g. written by `viditq search`), checked: the errors name the file and what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no plan file at {path!r}; pass the path of a plan JSON written by `viditq search` "
                                f"or `viditq refine` (or a plan dict).")
    try:
        data = read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"plan file {path!r} is not valid JSON ({e}); it is empty, truncated or not a plan. "
                         f"Write it again (`viditq search --out`) or fix it.") from None
    try:
        return plan_from_json(data)
    except (TypeError, ValueError) as e:
        raise type(e)(f"plan file {path!r}: {e}") from None


def plan_to_json(plan: dict) -> dict:
    """The JSON form of an in-memory plan (`"layers"` entries as dicts), as config.json and plan files hold it."""
    return {**plan, "layers": {name: spec.to_json() for name, spec in plan["layers"].items()}}


WILDCARDS = frozenset("*?[")  # fnmatch's special characters


def name_runs(name: str) -> set[str]:
    """Every run of consecutive dotted components of a module name: "blocks.0.attn.to_k" gives "to_k", "attn",
    "attn.to_k", "blocks.0", ..., and the name itself."""
    parts = name.split(".")
    return {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}


def pattern_matches(pattern: str, runs: set[str]) -> bool:
    """`pattern` equals, or fnmatches, one of `runs` (see `matches_any`)."""
    if WILDCARDS.isdisjoint(pattern):
        return pattern in runs
    return any(fnmatch.fnmatchcase(run, pattern) for run in runs)


def matches_any(name: str, patterns: list[str]) -> bool:
    """A `modules_to_not_convert` entry matches a module when it equals, or fnmatches, a run of whole dotted
    components of the module's name: the leaf ("to_k" matches every "....attn1.to_k"), any component or run of
    them ("proj_out" also matches "single_transformer_blocks.0.proj_out", "attn2" every layer under an attn2,
    "transformer_blocks.0" that block's layers), the full name, a prefix, or a pattern such as
    "transformer_blocks.*.ff.*" or "to_*". Components match whole, unlike bitsandbytes' and torchao's substring
    test: "transformer_blocks.0" does not match "single_transformer_blocks.0.attn.to_q", nor
    "transformer_blocks.1" "transformer_blocks.10.attn1.to_q"."""
    runs = name_runs(name)
    return any(pattern_matches(p, runs) for p in patterns)


def calibration_absmax(calibration, name: str, preset: str):
    """Per-channel input absmax `[in]` (CalibrationStats) or a float (`{layer: absmax}`) for one layer."""
    from .calibration import CalibrationStats

    if isinstance(calibration, str):
        raise TypeError("load the statistics first (CalibrationStats.load); the config resolves paths itself")
    table = calibration.channel_absmax if isinstance(calibration, CalibrationStats) else calibration
    if name not in table:
        raise ValueError(
            f"calibration has no activation statistics for layer '{name}'; calibrate this model "
            f"(viditq_diffusers.calibrate) before using preset {preset!r}."
        )
    return table[name]


def layer_spec(name: str, linear: nn.Module, config, index: int = 0) -> LayerSpec:
    if config.group_size and linear.in_features % config.group_size:
        raise ValueError(
            f"group_size={config.group_size} does not divide in_features={linear.in_features} of layer '{name}'; "
            f"pick a group size that divides every quantized layer, or keep '{name}' in floating point "
            f"with modules_to_not_convert=['{name}']."
        )
    optional = {}
    if config.per_tensor:
        optional["weight_per_tensor"] = True
    if config.balance in ("smooth", "smooth_rotate", "search"):
        calibration_absmax(config.calibration, name, config.preset)  # fail before any weight is read
        # "auto" / "search" until the layer's weight is seen (recipe.decide_layer decides)
        optional["smooth_alpha"] = "search" if config.balance == "search" else config.alpha
    if config.balance in ("rotate", "smooth_rotate"):
        try:
            check_order(linear.in_features)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e} (modules_to_not_convert=['{name}'])") from None
        optional["rotation_seed"] = config.rotation_seed + index
    if config.balance == "search" and rotatable(linear.in_features):  # a candidate; the search may drop it
        optional["rotation_seed"] = config.rotation_seed + index
    if config.early_weight_bits is not None:  # timestep-wise: another weight copy for the early steps
        optional.update(early_weight_bits=config.early_weight_bits, early_timestep=float(config.early_timestep))
    if config.static_acts and "smooth_alpha" not in optional:  # smoothed static scales come with the weight
        _, qmax = qrange(config.act_bits)
        absmax = calibration_absmax(config.calibration, name, config.preset)
        optional["act_scale"] = float(torch.as_tensor(absmax).max()) / qmax
    return LayerSpec.for_linear(linear, config.weight_bits, config.act_bits, config.group_size,
                                config.weight_symmetric, **optional)


def warn_unmatched(model: nn.Module, patterns: list[str]) -> None:
    """Warn about each `modules_to_not_convert` entry that matches no module of `model` by `matches_any`'s rule (a
    typo keeps nothing in floating point, silently otherwise)."""
    runs = set().union(*(name_runs(name) for name, _ in model.named_modules() if name))
    for pattern in patterns:
        if not pattern_matches(pattern, runs):
            warnings.warn(f"modules_to_not_convert entry {pattern!r} matches no module of {type(model).__name__}, so "
                          f"it keeps nothing in floating point; check it against model.named_modules(): an entry "
                          f"matches a layer's name, a dotted component or run of them ('to_k', 'proj_out', "
                          f"'transformer_blocks.0'), or is an fnmatch pattern such as 'transformer_blocks.*.ff.*'.",
                          stacklevel=3)


def build_plan(model: nn.Module, config) -> dict:
    """The default plan: every attention / FFN linear of the blocks, minus `modules_to_not_convert`."""
    warn_unmatched(model, config.modules_to_not_convert)
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and is_quantized_by_default(model, name)
        and not matches_any(name, config.modules_to_not_convert)
    ]
    layers = {name: layer_spec(name, model.get_submodule(name), config, i) for i, name in enumerate(names)}
    for name in names:
        if is_weight_only_by_default(model, name):  # T5's `wo`: activations stay floating point, in any preset
            layers[name] = replace(layers[name], act_bits=16, smooth_alpha=None, rotation_seed=None, act_scale=None)
    if config.mixed == "reference":
        from .reference_mixed_precision import reference_w8_layers

        for name in reference_w8_layers(model) & set(layers):
            layers[name] = replace(layers[name], weight_bits=8)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layers: ViDiT-Q quantizes the nn.Linear layers inside "
            f"transformer blocks, and none were found (or all are in modules_to_not_convert). "
            f"Pass a model with transformer blocks, or an explicit plan."
        )
    return {"version": PLAN_VERSION, "model_class": type(model).__name__, "layers": layers}


def validate_plan(model: nn.Module, plan: dict) -> None:
    """Check that `plan` (entries as `LayerSpec`s or JSON) fits `model`'s architecture; raise a ValueError that
    names the mismatch."""
    plan = plan_from_json(plan)
    if not plan["layers"]:
        raise ValueError(f"the quantization plan for {type(model).__name__} has no layers ('layers' is empty): a "
                         f"plan quantizes at least one layer. Quantize without a plan to get the default one.")
    modules = dict(model.named_modules())
    problems = []
    for name, spec in plan["layers"].items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: no such layer in {type(model).__name__}")
        elif not hasattr(module, "in_features"):
            problems.append(f"{name}: is a {type(module).__name__}, not a linear layer")
        elif (module.in_features, module.out_features) != (spec.in_features, spec.out_features):
            problems.append(
                f"{name}: plan says {spec.in_features}->{spec.out_features} features, "
                f"model has {module.in_features}->{module.out_features}"
            )
        elif (module.bias is not None) != spec.bias:
            problems.append(f"{name}: plan says bias={spec.bias}, model layer has bias={module.bias is not None}")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise ValueError(
            f"The quantization plan does not match {type(model).__name__} ({len(problems)} problem(s)):\n  {shown}\n"
            f"The plan was made for another architecture or config; build a new plan for this model."
        )


def summarize(plan: dict) -> dict[str, int]:
    """Count of layers per format label, e.g. {"W8A8": 12, "W4A8-g32": 4}."""
    counts: dict[str, int] = {}
    for spec in plan["layers"].values():
        label = spec.label()
        counts[label] = counts.get(label, 0) + 1
    return counts


SCALE_BITS, ZERO_BITS = 32, 8  # a weight scale is stored as fp32 bits, a zero point as int8


def stored_weight_bits(spec: LayerSpec) -> float:
    """Bits stored per weight of a layer: the codes plus, with `group_size`, each group's scale and zero point
    (the usual count, e.g. "4.25 bits" for 4-bit g128 with fp16 scales: group scales grow with the weights,
    a per-channel scale does not). A timestep-wise layer holds both of its copies."""
    group = SCALE_BITS + (0 if spec.symmetric else ZERO_BITS)
    per_copy = group / spec.group_size if spec.group_size else 0.0
    return sum(bits + per_copy for bits in (spec.weight_bits, spec.early_weight_bits) if bits)


def average_weight_bits(plan: dict) -> float:
    """Stored weight bits per quantized weight (`stored_weight_bits`), averaged over the plan's layers by
    weight count."""
    sizes = [(stored_weight_bits(spec), spec.in_features * spec.out_features) for spec in plan["layers"].values()]
    return sum(bits * n for bits, n in sizes) / sum(n for _, n in sizes)


def summarize_recipes(plan: dict) -> dict[str, int]:
    """Count of layers per channel-balancing recipe (see `recipe_label`)."""
    counts: dict[str, int] = {}
    for spec in plan["layers"].values():
        label = spec.recipe_label()
        counts[label] = counts.get(label, 0) + 1
    return counts
