"""The `w4a8_mp` preset: the paper's reference heuristic (W8 FFNs and first / last blocks, W4 attention)."""

import torch

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.plan import average_weight_bits
from viditq_diffusers.testing.zoo import ZOO, run


def build(cls_name, **overrides):
    entry = ZOO[cls_name]
    torch.manual_seed(0)
    return entry.cls(**{**entry.kwargs, **overrides}).eval(), entry.make_inputs(0)


def bits(model):
    return {name: m.weight_bits for name, m in model.named_modules() if isinstance(m, ViDiTQLinear)}


def test_pixart_ffns_and_end_blocks_are_w8_middle_attention_w4():
    model, _ = build("PixArtTransformer2DModel", num_layers=4)
    got = bits(quantize(model, ViDiTQConfig(preset="w4a8_mp")))
    for name, b in got.items():
        block = int(name.split(".")[1])
        expected = 8 if ".ff." in name or block in (0, 3) else 4
        assert b == expected, (name, b)
    assert sum(b == 4 for b in got.values()) == 2 * 8  # attn1 + attn2 (4 linears each) of blocks 1 and 2


def test_flux_single_stream_ffn_halves_are_w8():
    model, _ = build("FluxTransformer2DModel", num_layers=3, num_single_layers=3)
    got = bits(quantize(model, ViDiTQConfig(preset="w4a8_mp")))
    assert got["single_transformer_blocks.1.proj_mlp"] == got["single_transformer_blocks.1.proj_out"] == 8
    assert got["single_transformer_blocks.1.attn.to_q"] == 4
    assert got["transformer_blocks.1.attn.add_k_proj"] == 4 and got["transformer_blocks.1.ff_context.net.2"] == 8
    assert got["transformer_blocks.0.attn.to_q"] == got["single_transformer_blocks.2.attn.to_v"] == 8


def test_latte_temporal_ffn_w8_temporal_attention_w4():
    model, _ = build("LatteTransformer3DModel", num_layers=3)
    got = bits(quantize(model, ViDiTQConfig(preset="w4a8_mp")))
    assert got["temporal_transformer_blocks.1.ff.net.2"] == 8
    assert got["temporal_transformer_blocks.1.attn1.to_k"] == 4
    assert got["temporal_transformer_blocks.2.attn1.to_k"] == 8


def test_mixed_plan_runs_reloads_bit_identically_and_reports_its_bits(tmp_path):
    model, inputs = build("PixArtTransformer2DModel", num_layers=4)
    config = ViDiTQConfig(preset="w4a8_mp")
    assert config.label == "W4A8-MP"
    quantize(model, config)
    plan = model.config.quantization_config.plan
    assert 4 < average_weight_bits(plan) < 8
    with torch.no_grad():
        out = run(model, inputs)
    model.save_pretrained(tmp_path / "mp")
    reloaded = type(model).from_pretrained(tmp_path / "mp")
    assert bits(reloaded) == bits(model)
    with torch.no_grad():
        assert torch.equal(run(reloaded, inputs), out)
