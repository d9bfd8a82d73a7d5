"""`QuantPlan`: the per-layer decisions, as plain JSON data.

A plan is a dict written into `config.json` (`quantization_config["plan"]`), so a saved
checkpoint rebuilds its exact layout before any weight is read:

    {"version": 1, "model_class": "PixArtTransformer2DModel",
     "layers": {"transformer_blocks.0.attn1.to_q": {
         "weight_bits": 8, "act_bits": 8, "group_size": null, "symmetric": false,
         "method": "minmax", "in_features": 1152, "out_features": 1152, "bias": true}}}

Layers absent from `layers` stay in floating point. After quantization the plan also records
`"dtype"`, the compute dtype the model was quantized in, so a reload without `torch_dtype`
gets the same floating-point layers back. Future per-layer fields (a smoothing
vector name, a rotation seed, per-timestep-window bits as `"windows": [{"until": 0.25,
"weight_bits": 8}, ...]`) are added as new keys with a version bump; a reader refuses keys
it does not know rather than ignoring them.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from .architectures import is_quantized_by_default
from .quant.formats import qrange
from .quant.hadamard import check_order, rotatable

PLAN_VERSION = 1
LAYER_KEYS = {"weight_bits", "act_bits", "group_size", "symmetric", "method", "in_features", "out_features", "bias"}
# Optional per-layer fields (absent = default): the naive baseline's per-tensor weights and static activation
# scale; channel balancing's smoothing exponent (the factors themselves are the `act_smooth` tensor) and
# rotation seed.
OPTIONAL_LAYER_KEYS = {"weight_per_tensor": False, "act_scale": None, "smooth_alpha": None, "rotation_seed": None,
                       "early_weight_bits": None, "early_timestep": None}
METHODS = {"minmax"}


def matches_any(name: str, patterns: list[str]) -> bool:
    """`name` is a pattern, lies under a pattern (prefix + "."), or fnmatches it."""
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


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


def layer_spec(name: str, linear: nn.Module, config, index: int = 0) -> dict:
    if config.group_size and linear.in_features % config.group_size:
        raise ValueError(
            f"group_size={config.group_size} does not divide in_features={linear.in_features} of layer '{name}'; "
            f"pick a group size that divides every quantized layer, or keep '{name}' in floating point "
            f"with modules_to_not_convert=['{name}']."
        )
    spec = {
        "weight_bits": config.weight_bits,
        "act_bits": config.act_bits,
        "group_size": config.group_size,
        "symmetric": config.weight_symmetric,
        "method": "minmax",
        "in_features": linear.in_features,
        "out_features": linear.out_features,
        "bias": linear.bias is not None,
    }
    if config.per_tensor:
        spec["weight_per_tensor"] = True
    if config.balance in ("smooth", "smooth_rotate", "search"):
        calibration_absmax(config.calibration, name, config.preset)  # fail before any weight is read
        # "auto" / "search" until the layer's weight is seen (balancing.py decides and writes the result here)
        spec["smooth_alpha"] = "search" if config.balance == "search" else config.alpha
    if config.balance in ("rotate", "smooth_rotate"):
        try:
            check_order(linear.in_features)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e} (modules_to_not_convert=['{name}'])") from None
        spec["rotation_seed"] = config.rotation_seed + index
    if config.balance == "search" and rotatable(linear.in_features):  # a candidate; the search may drop it
        spec["rotation_seed"] = config.rotation_seed + index
    if config.early_weight_bits is not None:  # timestep-wise: another weight copy for the early steps
        spec["early_weight_bits"], spec["early_timestep"] = config.early_weight_bits, float(config.early_timestep)
    if config.static_acts and "smooth_alpha" not in spec:  # smoothed static scales come with the weight
        _, qmax = qrange(config.act_bits)
        spec["act_scale"] = float(torch.as_tensor(calibration_absmax(config.calibration, name, config.preset)).max()) / qmax
    return spec


def build_plan(model: nn.Module, config) -> dict:
    """The default plan: every attention / FFN linear of the blocks, minus `modules_to_not_convert`."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and is_quantized_by_default(model, name)
        and not matches_any(name, config.modules_to_not_convert)
    ]
    layers = {name: layer_spec(name, model.get_submodule(name), config, i) for i, name in enumerate(names)}
    if config.mixed == "reference":
        from .reference_mixed_precision import reference_w8_layers

        for name in reference_w8_layers(model) & set(layers):
            layers[name]["weight_bits"] = 8
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layers: ViDiT-Q quantizes the nn.Linear layers inside "
            f"transformer blocks, and none were found (or all are in modules_to_not_convert). "
            f"Pass a model with transformer blocks, or an explicit plan."
        )
    return {"version": PLAN_VERSION, "model_class": type(model).__name__, "layers": layers}


def validate_plan(model: nn.Module, plan: dict) -> None:
    """Check that `plan` fits `model`'s architecture; raise a ValueError that names the mismatch."""
    if not isinstance(plan, dict) or "layers" not in plan:
        raise ValueError("plan must be a dict with a 'layers' mapping (see viditq_diffusers.plan).")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(
            f"plan version {plan.get('version')!r} is not supported by this viditq_diffusers (reads version "
            f"{PLAN_VERSION}); upgrade viditq-diffusers or re-quantize the model."
        )
    modules = dict(model.named_modules())
    problems = []
    for name, spec in plan["layers"].items():
        unknown = set(spec) - LAYER_KEYS - set(OPTIONAL_LAYER_KEYS)
        missing = LAYER_KEYS - set(spec)
        module = modules.get(name)
        if unknown or missing:
            problems.append(f"{name}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
        elif module is None:
            problems.append(f"{name}: no such layer in {type(model).__name__}")
        elif not hasattr(module, "in_features"):
            problems.append(f"{name}: is a {type(module).__name__}, not a linear layer")
        elif (module.in_features, module.out_features) != (spec["in_features"], spec["out_features"]):
            problems.append(
                f"{name}: plan says {spec['in_features']}->{spec['out_features']} features, "
                f"model has {module.in_features}->{module.out_features}"
            )
        elif spec["method"] not in METHODS:
            problems.append(f"{name}: unknown method {spec['method']!r}")
        elif (module.bias is not None) != spec["bias"]:
            problems.append(f"{name}: plan says bias={spec['bias']}, model layer has bias={module.bias is not None}")
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
        group = f"-g{spec['group_size']}" if spec["group_size"] else ""
        group += "-tensor" if spec.get("weight_per_tensor") else ""
        group += "-static" if spec.get("act_scale") is not None else ""
        early = f" (W{spec['early_weight_bits']} while t >= {spec['early_timestep']:g})" if spec.get("early_weight_bits") else ""
        label = f"W{spec['weight_bits']}A{spec['act_bits']}{group}{early}"
        counts[label] = counts.get(label, 0) + 1
    return counts


SCALE_BITS, ZERO_BITS = 32, 8  # a weight scale is stored as fp32 bits, a zero point as int8


def stored_weight_bits(spec: dict) -> float:
    """Bits stored per weight of a layer: the codes plus, with `group_size`, each group's scale and zero point
    (the usual count, e.g. "4.25 bits" for 4-bit g128 with fp16 scales: group scales grow with the weights,
    a per-channel scale does not). A timestep-wise layer holds both of its copies."""
    group = SCALE_BITS + (0 if spec["symmetric"] else ZERO_BITS)
    per_copy = group / spec["group_size"] if spec["group_size"] else 0.0
    return sum(bits + per_copy for bits in (spec["weight_bits"], spec.get("early_weight_bits")) if bits)


def average_weight_bits(plan: dict) -> float:
    """Stored weight bits per quantized weight (`stored_weight_bits`), averaged over the plan's layers by
    weight count."""
    sizes = [(stored_weight_bits(spec), spec["in_features"] * spec["out_features"]) for spec in plan["layers"].values()]
    return sum(bits * n for bits, n in sizes) / sum(n for _, n in sizes)


def recipe_label(alpha, rotation_seed) -> str:
    """"plain", "smooth", "rotate" or "smooth+rotate": what a layer's channel balancing amounts to."""
    parts = (["smooth"] if alpha is not None else []) + (["rotate"] if rotation_seed is not None else [])
    return "+".join(parts) or "plain"


def summarize_recipes(plan: dict) -> dict[str, int]:
    """Count of layers per channel-balancing recipe (see `recipe_label`)."""
    counts: dict[str, int] = {}
    for spec in plan["layers"].values():
        label = recipe_label(spec.get("smooth_alpha"), spec.get("rotation_seed"))
        counts[label] = counts.get(label, 0) + 1
    return counts
