"""Static-dynamic channel balancing end to end: layer, config, plan, automatic alpha, save/reload."""

import pytest
import torch
from diffusers import DiffusionPipeline, PixArtTransformer2DModel

from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.calibration import calibrate
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.nn import ViDiTQLinear
from viditq_diffusers.quant.channel_balance import balance_weight, smoothing_factors
from viditq_diffusers.quant.formats import quantize_weight
from viditq_diffusers.recipe import ALPHA_GRID, layer_error
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

CALL = dict(height=32, width=32, use_resolution_binning=False, clean_caption=False)


def outlier_input(n=64, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, [3, 50]] *= 60.0  # static channel outliers
    return x


def test_balanced_layer_quantizes_the_transformed_weight_once():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 32)
    m = smoothing_factors(outlier_input().abs().amax(0), linear.weight, 0.5)
    layer = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4, smooth_alpha=0.5, rotation_seed=7), m)
    codes, scale, zero = quantize_weight(balance_weight(linear.weight.double(), m, 7), 4)
    assert torch.equal(layer.codes(), codes) and torch.equal(layer.scales(), scale)
    assert torch.equal(layer.weight_zero, zero)
    assert "smoothed" in repr(layer) and "seed 7" in repr(layer)


def test_balancing_cuts_the_error_of_outlier_inputs():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 32)
    x = outlier_input()
    ref = linear(x)
    m = smoothing_factors(x.abs().amax(0), linear.weight, 0.5)
    plain = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4))
    balanced = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 4, smooth_alpha=0.5, rotation_seed=0), m)
    err = {name: ((layer(x) - ref).norm() / ref.norm()).item() for name, layer in
           (("plain", plain), ("balanced", balanced))}
    assert err["balanced"] < 0.5 * err["plain"], err
    # the integer path and the float64 reference agree; dequantized_weight() is in the original basis
    assert torch.allclose(balanced(x).double(), balanced.reference_forward(x), rtol=1e-4, atol=1e-4)
    w8 = ViDiTQLinear.from_linear(linear, LayerSpec.for_linear(linear, 8, smooth_alpha=0.5, rotation_seed=0), m)
    assert (w8.dequantized_weight() - linear.weight).abs().max() < 0.05 * linear.weight.abs().max()


def test_presets_that_need_statistics_say_how_to_calibrate():
    for preset in ("smooth_w4a8", "smoothquant_w8a8", "naive_w8a8"):
        with pytest.raises(ValueError, match="viditq calibrate|calibration="):
            ViDiTQConfig(preset=preset)
    with pytest.raises(ValueError, match="balance must be one of"):
        ViDiTQConfig(preset="w4a8", balance="twist")
    with pytest.raises(ValueError, match="alpha must be in"):
        ViDiTQConfig(preset="rotate_w4a8", alpha=1.5)
    assert ViDiTQConfig(preset="w4a8").balance is None  # no statistics: plain per-token W4A8
    assert ViDiTQConfig(preset="rotate_w4a8").balance == "rotate"  # rotation alone needs none


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pipe") / "pipe", seed=0)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    stats = calibrate(pipe, ["a thick digit 7", "a thin digit 1"], num_inference_steps=3, **CALL)
    return path, pipe, stats


def test_viditq_w4a8_from_pretrained_saves_and_reloads_bit_identically(tiny, tmp_path):
    path, pipe, stats = tiny
    stats_file = tmp_path / "stats.safetensors"
    stats.save(stats_file)
    config = ViDiTQConfig(preset="w4a8", calibration=str(stats_file))  # a path works as well as the object
    assert config.balance == "search" and config.alpha == "auto"  # the per-layer recipe search
    model = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer", quantization_config=config)
    plan = model.config.quantization_config.plan["layers"]
    # every layer's recipe is decided and recorded: alpha a number or None (no smoothing), a seed or None
    assert all(spec.smooth_alpha is None or 0 <= spec.smooth_alpha <= 1 for spec in plan.values())
    assert all(spec.rotation_seed is None or isinstance(spec.rotation_seed, int) for spec in plan.values())
    assert model.config.quantization_config.calibration is None

    model.save_pretrained(tmp_path / "q")
    again = PixArtTransformer2DModel.from_pretrained(tmp_path / "q")
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16), timestep=torch.tensor([10, 700]),
                  encoder_hidden_states=torch.randn(2, 8, 32),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, again(**inputs).sample)
    # the same as quantizing the loaded FP model with the statistics object
    fp = PixArtTransformer2DModel.from_pretrained(path, subfolder="transformer")
    direct = quantize(fp, ViDiTQConfig(preset="w4a8", calibration=stats))
    with torch.no_grad():
        assert torch.equal(direct(**inputs).sample, model(**inputs).sample)


def test_auto_alpha_is_no_worse_than_any_global_alpha_per_layer(tiny):
    path, pipe, stats = tiny
    fp = pipe.transformer
    model = quantize(DiffusionPipeline.from_pretrained(path).transformer,
                     ViDiTQConfig(preset="w4a8", calibration=stats, alpha="auto", balance="smooth_rotate"))
    searched = quantize(DiffusionPipeline.from_pretrained(path).transformer,
                        ViDiTQConfig(preset="w4a8", calibration=stats))
    for name, spec in model.config.quantization_config.plan["layers"].items():
        weight, tokens = fp.get_submodule(name).weight.detach(), stats.sample_tokens[name]
        a = stats.channel_absmax[name]

        def err(alpha, spec=spec):
            return layer_error(weight, tokens, spec, None if alpha is None else smoothing_factors(a, weight, alpha))
        assert err(spec.smooth_alpha) <= min(err(g) for g in ALPHA_GRID) + 1e-6
        # the per-layer recipe search does at least as well as the paper's recipe on every layer
        chosen = searched.config.quantization_config.plan["layers"][name]
        assert err(chosen.smooth_alpha, chosen) <= err(spec.smooth_alpha) * (1 + 1e-6)


def test_statistics_of_another_model_are_refused(tiny):
    _, _, stats = tiny
    other = PixArtTransformer2DModel(sample_size=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                     in_channels=4, cross_attention_dim=16, caption_channels=32,
                                     norm_type="ada_norm_single", num_embeds_ada_norm=1000)
    with pytest.raises(ValueError, match="recalibrate"):
        quantize(other, ViDiTQConfig(preset="w4a8", calibration=stats))
