"""Property tests (hypothesis, derandomized so CI runs the same cases every time) for the two documents a user
writes: `ViDiTQConfig` arguments and plan JSON.

- Random config arguments, valid and not (floats, bools, strings, negatives, huge numbers, NaN, lists): either a
  config that round-trips through `to_dict` / `from_dict` and through its JSON identically, or our ValueError /
  TypeError naming an argument it was given, never another exception.
- Random valid plan entries round-trip through `LayerSpec` and `plan_from_json` / `plan_to_json` byte for byte;
  each entry mutated in one field (a bad value, a missing or an unknown key) is refused with our error naming the
  layer and the field.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.layer_spec import LAYER_KEYS, LayerSpec
from viditq_diffusers.plan import PLAN_VERSION, plan_from_json, plan_to_json
from viditq_diffusers.quant.hadamard import rotatable

CASES = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONFIG_CASES, ROUND_TRIP_CASES, MUTATION_CASES = 400, 300, 600

# values that are wrong for most arguments: every kind of thing a caller might pass by mistake
JUNK = st.sampled_from([None, True, False, "8", "yes", "", -1, 0, 2**70, -(2**70), 8.7, 16.5, 1.9, -0.5, math.nan,
                        math.inf, -math.inf, [8], ["a"], {"a": 1}, (4,), b"x", 1e300])


def maybe(valid):
    """Mostly valid values, sometimes junk."""
    return st.one_of(valid, valid, JUNK)


CONFIG_ARGUMENTS = {
    "preset": maybe(st.sampled_from(["w8a8", "w4a8", "w8a16", "w4a16", "w4a8_mp", "rotate_w4a8", "rotate_w8a8",
                                     "naive_w8a8", "smooth_w8a8", "w3a3"])),
    "weight_bits": maybe(st.sampled_from([None, 4, 8, 8.0, 6, 16])),
    "act_bits": maybe(st.sampled_from([None, 4, 8, 16, 32])),
    "group_size": maybe(st.one_of(st.none(), st.integers(-4, 2**40), st.sampled_from([16.0, 32.5]))),
    "modules_to_not_convert": maybe(st.one_of(st.none(), st.text(max_size=12),
                                              st.lists(st.text(min_size=1, max_size=12), max_size=3))),
    "components": maybe(st.one_of(st.text(max_size=12), st.lists(st.text(max_size=12), max_size=3))),
    "calibration": maybe(st.one_of(st.none(), st.dictionaries(st.text(min_size=1, max_size=8),
                                                              st.floats(allow_nan=True), max_size=2))),
    "weight_symmetric": maybe(st.sampled_from([None, True, False, 0, 1, "no"])),
    "balance": maybe(st.sampled_from(["preset", None, "smooth", "rotate", "smooth_rotate", "search", "both"])),
    "alpha": maybe(st.one_of(st.none(), st.just("auto"), st.floats(-1, 2), st.just("0.5"))),
    "rotation_seed": maybe(st.one_of(st.integers(-10, 2**66), st.floats(-10, 10))),
    "early_weight_bits": maybe(st.sampled_from([None, 4, 8, 6])),
    "early_timestep": maybe(st.one_of(st.integers(-10, 2000), st.floats())),
}


@settings(max_examples=CONFIG_CASES, **CASES)
@given(st.fixed_dictionaries({}, optional=CONFIG_ARGUMENTS))
def test_config_arguments_give_a_round_tripping_config_or_our_error(kwargs):
    try:
        config = ViDiTQConfig(**kwargs)
    except (TypeError, ValueError) as error:
        message = str(error)
        named = [name for name in [*kwargs, "preset"] if name in message]
        assert named, f"{type(error).__name__} names no argument of {kwargs}: {message}"
        return
    back = ViDiTQConfig.from_dict(config.to_dict())
    assert back == config and back.to_dict() == config.to_dict()
    assert ViDiTQConfig.from_dict(json.loads(config.to_json_string())) == config
    # what was accepted is exactly what was asked for: nothing truncated, nothing read as true
    for name in ("weight_bits", "act_bits", "group_size", "rotation_seed", "early_weight_bits"):
        value, asked = getattr(config, name), kwargs.get(name)
        assert value is None or type(value) is int
        if asked is not None:
            assert value == asked
    assert type(config.weight_symmetric) is bool
    assert config.weight_symmetric == bool(kwargs.get("weight_symmetric") or False)


# -- plans ------------------------------------------------------------------------------------------------------

@st.composite
def layer_entries(draw) -> dict:
    """A valid plan entry as JSON, with some optional keys (written in a random order)."""
    in_features = draw(st.sampled_from([32, 48, 64, 96, 100]))
    entry = {"weight_bits": draw(st.sampled_from([4, 8])), "act_bits": draw(st.sampled_from([4, 8, 16])),
             "group_size": draw(st.sampled_from([None] + [g for g in (8, 16, 32) if in_features % g == 0])),
             "symmetric": draw(st.booleans()), "method": "minmax", "in_features": in_features,
             "out_features": draw(st.integers(1, 4096)), "bias": draw(st.booleans())}
    optional = {
        "weight_per_tensor": st.booleans(),
        "smooth_alpha": st.one_of(st.none(), st.sampled_from(["auto", "search"]), st.floats(0, 1)),
        "rotation_seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)) if rotatable(in_features) else st.none(),
        "act_scale": st.one_of(st.none(), st.floats(0, 1e6)),
    }
    entry.update(draw(st.fixed_dictionaries({}, optional=optional)))
    if draw(st.booleans()):
        entry.update(early_weight_bits=draw(st.sampled_from([4, 8])), early_timestep=draw(st.floats(-1e4, 1e4)))
    keys = draw(st.permutations(list(entry)))
    return {k: entry[k] for k in keys}


@settings(max_examples=ROUND_TRIP_CASES, **CASES)
@given(st.dictionaries(st.from_regex(r"blocks\.[0-9]\.(attn|ff)\.[a-z]{1,4}", fullmatch=True), layer_entries(),
                       min_size=1, max_size=4),
       st.sampled_from([None, "float32", "bfloat16"]))
def test_valid_plans_round_trip_byte_for_byte(layers, dtype):
    plan = {"version": PLAN_VERSION, "model_class": "PixArtTransformer2DModel", "layers": layers}
    if dtype:
        plan["dtype"] = dtype
    text = json.dumps(plan)
    read = plan_from_json(json.loads(text))
    assert all(isinstance(spec, LayerSpec) for spec in read["layers"].values())
    assert json.dumps(plan_to_json(read)) == text
    assert plan_from_json(plan_to_json(read)) == read


BAD_VALUES = {
    "weight_bits": [6, 16, 8.5, "8", True, None, -4, 2**80, [8]],
    "act_bits": [2, 32, 16.5, "16", False, None],
    "group_size": [0, -16, 16.5, "16", True, 7, 2**70],
    "symmetric": ["no", "false", 0, 1, None, 0.0],
    "bias": ["yes", 1, None, []],
    "method": ["gptq", 3, None, ""],
    "in_features": [0, -1, 32.5, "32", True, None],
    "out_features": [0, -5, 1.5, "4", False],
    "weight_per_tensor": ["True", 1, 0.5],
    "smooth_alpha": [1.5, -0.1, math.nan, math.inf, "half", True],
    "rotation_seed": [-1, 1.5, "0", True, 2**64],
    "early_weight_bits": [6, "8", 8.5, True],
    "early_timestep": [math.nan, math.inf, -math.inf, "750", True],
    "act_scale": [-1.0, math.nan, math.inf, "1", True],
}


@settings(max_examples=MUTATION_CASES, **CASES)
@given(layer_entries(), st.data())
def test_mutated_plan_entries_are_refused_naming_the_field(entry, data):
    kind = data.draw(st.sampled_from(["value", "value", "value", "missing", "unknown"]))
    if kind == "value":
        field = data.draw(st.sampled_from(sorted(BAD_VALUES)))
        entry[field] = data.draw(st.sampled_from(BAD_VALUES[field]))
        if field == "early_weight_bits":
            entry.setdefault("early_timestep", 500.0)
    elif kind == "missing":
        field = data.draw(st.sampled_from(sorted(LAYER_KEYS)))
        del entry[field]
    else:
        field = data.draw(st.sampled_from(["colour", "weight_bit", "Symmetric", "rotation"]))
        entry[field] = 1
    plan = {"version": PLAN_VERSION, "layers": {"blocks.0.attn.q": entry}}
    try:
        plan_from_json(json.loads(json.dumps(plan)))
    except (TypeError, ValueError) as error:
        message = str(error)
        assert "plan entry 'blocks.0.attn.q'" in message and field in message, message
    else:
        raise AssertionError(f"plan entry with {kind} {field}={entry.get(field)!r} was accepted")
