"""`LayerSpec`: one plan entry, i.e. how one `nn.Linear` is quantized (the plan is `plan.py`).

A frozen dataclass with the fields of the plan's JSON entry; `from_json` / `to_json` convert it without
changing a byte of the JSON (see `OPTIONAL_LAYER_KEYS` for the keys that may be absent).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import nn

from .checks import MAX_SEED, boolean, integer, real, shown
from .quant.hadamard import rotatable

LAYER_KEYS = {"weight_bits", "act_bits", "group_size", "symmetric", "method", "in_features", "out_features", "bias"}
# Optional per-layer fields (absent = default): the naive baseline's per-tensor weights and static activation
# scale; channel balancing's smoothing exponent and rotation seed; timestep-wise precision's early weight copy.
OPTIONAL_LAYER_KEYS = {"weight_per_tensor": False, "act_scale": None, "smooth_alpha": None, "rotation_seed": None,
                       "early_weight_bits": None, "early_timestep": None}
METHODS = {"minmax"}
UNDECIDED_ALPHAS = ("auto", "search")  # smooth_alpha placeholders that the layer's weight decides (recipe.py)


def precision_label(weight_bits: int, act_bits: int, group_size: int | None = None, per_tensor: bool = False,
                    static_act_scale: bool = False) -> str:
    """"W8A8", "W4A8-g64", "W8A8-tensor-static": weight and activation bits, the weight group size if any, and
    the naive baseline's per-tensor weight scale and static activation scale."""
    label = f"W{weight_bits}A{act_bits}" + (f"-g{group_size}" if group_size else "")
    return label + ("-tensor" if per_tensor else "") + ("-static" if static_act_scale else "")


@dataclass(frozen=True)
class LayerSpec:
    """One plan entry: how one `nn.Linear` is quantized. Fields in the order their JSON keys are written.

    `smooth_alpha` "auto" / "search" is a request (the plan is not `decided`): `recipe.decide_layer` returns
    the decided spec once the layer's weight is read.

    `json_keys`: the JSON keys in the order a plan file (or an earlier step) wrote them, so that a spec
    re-saves with the same keys in the same order, as the dict it replaced did: an optional key stays
    once written, even at its default (the recipe search writes `"rotation_seed": null` for "decided
    against"). Empty for a new spec: required keys, then the optional ones that differ from their
    default, in field order. Not part of equality.
    """

    weight_bits: int
    act_bits: int
    group_size: int | None
    symmetric: bool
    method: str
    in_features: int
    out_features: int
    bias: bool
    weight_per_tensor: bool = False
    smooth_alpha: float | str | None = None
    rotation_seed: int | None = None
    early_weight_bits: int | None = None
    early_timestep: float | None = None
    act_scale: float | None = None
    json_keys: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        # A plan entry comes from JSON a person may have edited: every field is checked, none is coerced in a way
        # that changes its meaning ("no" is not True, 8.7 is not 8). Integers are stored as Python ints.
        def set_int(name, **bounds):
            object.__setattr__(self, name, integer(getattr(self, name), name, **bounds))

        set_int("weight_bits", allowed=(4, 8))
        set_int("act_bits", allowed=(4, 8, 16))
        set_int("in_features", minimum=1)
        set_int("out_features", minimum=1)
        for name in ("symmetric", "bias", "weight_per_tensor"):
            object.__setattr__(self, name, boolean(getattr(self, name), name))
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {sorted(METHODS)})")
        if self.group_size is not None:
            set_int("group_size", minimum=1)
            if self.in_features % self.group_size:
                raise ValueError(f"group_size={self.group_size} does not divide in_features={self.in_features}")
        if isinstance(self.smooth_alpha, str):
            if self.smooth_alpha not in UNDECIDED_ALPHAS:
                raise ValueError(f"smooth_alpha must be a number, None, 'auto' or 'search', got {self.smooth_alpha!r}")
        elif self.smooth_alpha is not None:
            self._set_real("smooth_alpha", real(self.smooth_alpha, "smooth_alpha", minimum=0, maximum=1))
        if self.rotation_seed is not None:
            set_int("rotation_seed", minimum=0, maximum=MAX_SEED)
            if not rotatable(self.in_features):
                raise ValueError(f"rotation_seed is set, but no Hadamard rotation of order in_features="
                                 f"{self.in_features} exists; set rotation_seed to null")
        if self.early_weight_bits is not None:
            set_int("early_weight_bits", allowed=(4, 8))
            if self.early_timestep is None:
                raise ValueError("early_weight_bits needs early_timestep (the timestep from which on they apply)")
        if self.early_timestep is not None:
            self._set_real("early_timestep", real(self.early_timestep, "early_timestep"))
        if self.act_scale is not None:
            self._set_real("act_scale", real(self.act_scale, "act_scale", minimum=0))
        if not isinstance(self.json_keys, tuple):
            raise TypeError(f"json_keys must be a tuple, got {shown(self.json_keys)}")

    def _set_real(self, name: str, checked: float) -> None:
        """Keep a Python int or float as written (the JSON re-saves byte for byte); numpy numbers become floats."""
        if type(getattr(self, name)) not in (int, float):
            object.__setattr__(self, name, checked)

    @classmethod
    def for_linear(cls, linear: nn.Module, weight_bits: int = 8, act_bits: int = 8, group_size: int | None = None,
                   symmetric: bool = False, **optional) -> "LayerSpec":
        """A spec for `linear` (its features and bias), e.g. for `ViDiTQLinear.from_linear`."""
        return cls(weight_bits, act_bits, group_size, symmetric, "minmax", linear.in_features, linear.out_features,
                   linear.bias is not None, **optional)

    @classmethod
    def from_json(cls, data: dict, name: str = "") -> "LayerSpec":
        """The spec of a plan's JSON entry; a ValueError naming unknown or missing keys (`name`: the layer)."""
        if isinstance(data, LayerSpec):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"plan entry '{name}' must be a JSON object of the layer's fields, got {shown(data)}")
        unknown, missing = set(data) - LAYER_KEYS - set(OPTIONAL_LAYER_KEYS), LAYER_KEYS - set(data)
        if unknown or missing:
            raise ValueError(f"plan entry '{name}': unknown keys {sorted(unknown)} / missing keys {sorted(missing)}; "
                             f"the plan was written by another version of viditq-diffusers, or edited by hand.")
        try:
            return cls(**data, json_keys=tuple(data))
        except (TypeError, ValueError) as e:
            raise type(e)(f"plan entry '{name}': {e}") from None

    def to_json(self) -> dict:
        """The JSON entry: the `json_keys` in their order, then any other required key or optional key that
        differs from its default, in field order."""
        names = [f.name for f in fields(self) if f.name != "json_keys"]
        order = [*self.json_keys, *(n for n in names if n not in self.json_keys)]
        return {n: getattr(self, n) for n in order
                if n in LAYER_KEYS or n in self.json_keys or getattr(self, n) != OPTIONAL_LAYER_KEYS[n]}

    @property
    def decided(self) -> bool:
        """False while `smooth_alpha` is still a request ("auto" / "search") that the weight decides."""
        return self.smooth_alpha not in UNDECIDED_ALPHAS

    @property
    def smoothed(self) -> bool:
        """Whether the layer has smoothing factors (an `act_smooth` tensor); the spec must be decided."""
        return self.smooth_alpha is not None

    def with_recipe(self, smooth_alpha: float | None, rotation_seed: int | None) -> "LayerSpec":
        """This spec with a decided balancing recipe; both keys are written, None meaning "decided against"."""
        written = tuple(self.to_json())  # keep today's keys and order, add the two keys if new
        json_keys = written + tuple(k for k in ("smooth_alpha", "rotation_seed") if k not in written)
        return replace(self, smooth_alpha=smooth_alpha, rotation_seed=rotation_seed, json_keys=json_keys)

    def label(self) -> str:
        """The format, e.g. "W4A8-g64", "W8A8-tensor-static", "W4A8 (W8 while t >= 750)"."""
        label = precision_label(self.weight_bits, self.act_bits, self.group_size, self.weight_per_tensor,
                                self.act_scale is not None)
        if self.early_weight_bits:
            label += f" (W{self.early_weight_bits} while t >= {self.early_timestep:g})"
        return label

    def recipe_label(self) -> str:
        """The channel-balancing recipe: "plain", "smooth", "rotate" or "smooth+rotate"."""
        return recipe_label(self.smooth_alpha, self.rotation_seed)


def recipe_label(alpha, rotation_seed) -> str:
    """"plain", "smooth", "rotate" or "smooth+rotate": what a layer's channel balancing amounts to."""
    parts = (["smooth"] if alpha is not None else []) + (["rotate"] if rotation_seed is not None else [])
    return "+".join(parts) or "plain"
