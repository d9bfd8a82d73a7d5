"""Per-layer balancing recipe search (balance="search", the default with calibration statistics)."""

from dataclasses import replace

import pytest
import torch

from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.layer_spec import LayerSpec, recipe_label
from viditq_diffusers.plan import summarize_recipes
from viditq_diffusers.recipe import search_recipe

W8 = LayerSpec(8, 8, None, False, "minmax", 128, 96, True, rotation_seed=7)
W4 = replace(W8, weight_bits=4)


def test_rotation_chosen_for_heavy_tailed_activation_channels():
    """Token-varying spikes in a few channels: a static smoothing vector cannot tame them, a rotation spreads
    each spike over all channels, so the W8A8 per-token scales stop being dominated by it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    x += (torch.rand(256, 128, generator=g) < 0.02) * torch.randn(256, 128, generator=g) * 60
    w = torch.randn(96, 128, generator=g) * 0.05
    alpha, seed, errors = search_recipe(w, x.abs().amax(0), x, W8)
    assert seed == 7, errors
    assert errors["rotate"] < errors["plain"] / 4  # and clearly so
    assert min(errors.values()) == errors[recipe_label(alpha, seed)]


def test_rotation_refused_for_flat_4bit_weights():
    """Uniform ("flat") weight rows use the 4-bit grid well; rotating them makes them gaussian, whose tails
    stretch the min-max range, so W4 error grows and the search keeps the weights unrotated."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 128, generator=g)
    w = torch.rand(96, 128, generator=g) * 2 - 1
    alpha, seed, errors = search_recipe(w, x.abs().amax(0), x, W4)
    assert seed is None, errors
    assert errors["rotate"] > 1.5 * errors["plain"]


def test_no_rotation_candidate_without_a_seed_and_fixed_alpha():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g)
    alpha, seed, errors = search_recipe(w, x.abs().amax(0), x, replace(W8, rotation_seed=None), alpha=0.5)
    assert seed is None and set(errors) == {"plain", "smooth"} and alpha in (None, 0.5)


def test_search_is_the_default_with_calibration_and_needs_dynamic_activations():
    from viditq_diffusers.calibration import CalibrationStats

    stats = CalibrationStats("PixArtTransformer2DModel", {}, {}, {}, {}, {}, {}, {})
    assert ViDiTQConfig(preset="w4a8", calibration=stats).balance == "search"
    assert ViDiTQConfig(preset="paper_w4a8", calibration=stats).balance == "smooth_rotate"
    assert ViDiTQConfig(preset="w8a8").balance is None
    with pytest.raises(ValueError, match="static activation scales"):
        ViDiTQConfig(preset="smoothquant_w8a8", calibration=stats, balance="search")


def test_summarize_recipes_counts_each_kind():
    plain = replace(W8, rotation_seed=None)
    plan = {"layers": {"a": replace(plain, smooth_alpha=0.5, rotation_seed=1), "b": replace(plain, rotation_seed=2),
                       "c": plain, "d": replace(plain, smooth_alpha=0.3)}}
    assert summarize_recipes(plan) == {"smooth+rotate": 1, "rotate": 1, "plain": 1, "smooth": 1}
