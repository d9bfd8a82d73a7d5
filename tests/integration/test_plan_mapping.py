"""benchmarks/plan_mapping.py: the shipped searched plans mapped onto the PixArt-alpha-sized transformer keep each
source entry's recipe, take the big layers' shapes, and cover every quantizable layer."""

from dataclasses import fields

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from benchmarks.pixart_alpha import CONFIG
from benchmarks.plan_mapping import (SHIPPED_PLANS, cost_shape_map, layer_shapes, map_plan, meta_model,
                                     pixart_alpha_layer_shapes, shipped_plan_mapped, source_block, split_name)
from viditq_diffusers.architectures import default_layers
from viditq_diffusers.plan import read_plan, validate_plan

SHAPE_FIELDS = {"in_features", "out_features", "bias"}
RECIPE_FIELDS = [f.name for f in fields(read_plan(SHIPPED_PLANS[5])["layers"]["transformer_blocks.0.attn1.to_q"])
                 if f.name not in SHAPE_FIELDS | {"json_keys"}]


def test_block_rule_maps_first_to_first_and_last_to_last():
    assert [source_block(b, 28, 8) for b in range(28)] == [0] * 4 + [1] * 3 + [2] * 4 + [3] * 3 + [4] * 4 + [5] * 3 \
        + [6] * 4 + [7] * 3
    assert [source_block(b, 3, 8) for b in range(3)] == [0, 2, 5]


@pytest.mark.parametrize("bits", sorted(SHIPPED_PLANS))
def test_shipped_plan_maps_onto_a_wide_stand_in(bits):
    source = read_plan(SHIPPED_PLANS[bits])
    model = meta_model(num_layers=3)  # hidden 1152 as the real one, 3 blocks, no weights
    mapped = map_plan(source, model)
    validate_plan(model, mapped)  # names, shapes and biases fit the big model
    assert list(mapped["layers"]) == default_layers(model)
    modules = dict(model.named_modules())
    for name, spec in mapped["layers"].items():
        _, block, role = split_name(name)
        origin = source["layers"][f"transformer_blocks.{source_block(block, 3, 8)}.{role}"]
        assert {f: getattr(spec, f) for f in RECIPE_FIELDS} == {f: getattr(origin, f) for f in RECIPE_FIELDS}, name
        assert (spec.in_features, spec.out_features) == (modules[name].in_features, modules[name].out_features)
    assert layer_shapes(mapped) == pixart_alpha_layer_shapes(num_layers=3)
    assert {k for k, _ in layer_shapes(mapped).values()} == {1152, 4608}


def test_full_size_mapping_covers_all_280_layers():
    mapped = shipped_plan_mapped(5)
    assert len(mapped["layers"]) == 280 and set(layer_shapes(mapped)) == set(pixart_alpha_layer_shapes())


def test_a_recipe_that_does_not_fit_the_big_layer_is_refused():
    with torch.device("meta"):  # hidden 100: group size 64 does not divide it
        narrow = PixArtTransformer2DModel(**{**CONFIG, "num_layers": 2, "num_attention_heads": 2,
                                             "attention_head_dim": 50, "cross_attention_dim": 100})
    with pytest.raises(ValueError, match=r"layer 'transformer_blocks\.0\..*does not divide its in_features=100"):
        map_plan(read_plan(SHIPPED_PLANS[6]), narrow)


def test_cost_shape_map_gives_each_source_layer_the_shapes_of_the_big_layers_it_serves():
    source = read_plan(SHIPPED_PLANS[5])
    shapes = cost_shape_map(source)
    mapped = shipped_plan_mapped(5)
    assert set(shapes) == set(source["layers"])
    assert sum(len(triples) for triples in shapes.values()) == len(mapped["layers"]) == 280
    # block 7 of 8 serves big blocks 25..27; the caption keys see 2 x 120 rows, the FFN's second linear 2 x 256
    assert shapes["transformer_blocks.7.attn2.to_k"] == [[1152, 1152, 240]] * 3
    assert shapes["transformer_blocks.0.ff.net.2"] == [[4608, 1152, 512]] * 4
