"""Layer roles (viditq_diffusers/roles.py) on the real tiny zoo models: coverage, agreement with the default
quantization rule, per-family spot checks, role x block-range groups and the fallback for unknown classes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.architectures import is_quantized_by_default
from viditq_diffusers.mixed_precision import (
    FALLBACK_PATTERNS, ROLE_MAPS, Role, block_index, classify, group_layers, quantized_by_default,
)
from viditq_diffusers.roles import _match
from viditq_diffusers.testing.zoo import ZOO

# Variants of released checkpoints (SD3.5, Flux, Wan I2V, ...) that add linears the zoo defaults lack.
VARIANTS = {
    "SD3.5 dual attention": ("SD3Transformer2DModel", dict(dual_attention_layers=(0,), qk_norm="rms_norm")),
    "HunyuanDiT skip_linear": ("HunyuanDiT2DModel", dict(num_layers=3)),
    "Wan I2V": ("WanTransformer3DModel", dict(image_dim=32, added_kv_proj_dim=32)),
    "PixArt-alpha extra conditions": ("PixArtTransformer2DModel", dict(use_additional_conditions=True)),
    "CogVideoX 1.5": ("CogVideoXTransformer3DModel", dict(
        patch_size_t=2, ofs_embed_dim=32, use_rotary_positional_embeddings=True, sample_frames=9)),
    "Flux guidance": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
    "Sana guidance": ("SanaTransformer2DModel", dict(guidance_embeds=True)),
}


def _build(cls_name: str, **overrides) -> nn.Module:
    entry = ZOO[cls_name]
    if not overrides:
        return entry.build()
    torch.manual_seed(0)
    return entry.cls(**{**entry.kwargs, **overrides}).eval()


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, ViDiTQLinear))]


def _classify_quietly(model: nn.Module) -> dict[str, Role]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known class must not warn
        return classify(model)


MODELS = [pytest.param(name, {}, id=name) for name in ZOO] + [
    pytest.param(cls, kw, id=label) for label, (cls, kw) in VARIANTS.items()]


def test_role_maps_cover_the_zoo():
    assert set(ROLE_MAPS) == set(ZOO) and len(ZOO) == 15


@pytest.mark.parametrize("cls_name,overrides", MODELS)
def test_every_linear_has_a_role_that_agrees_with_the_default_rule(cls_name, overrides):
    model = _build(cls_name, **overrides)
    roles = _classify_quietly(model)
    assert list(roles) == _linears(model)  # every linear, nothing unclassified, model order
    disagree = {n: r.value for n, r in roles.items() if quantized_by_default(r) != is_quantized_by_default(model, n)}
    assert not disagree
    assert any(quantized_by_default(r) for r in roles.values()) and Role.OUTPUT in roles.values()


def test_fallback_patterns_agree_with_the_maps_except_dual_stream_image_side():
    """Name alone cannot tell a dual-stream image side from self-attention; everything else matches the maps."""
    for cls_name in ZOO:
        for name, role in _classify_quietly(_build(cls_name)).items():
            expected = Role.SELF_ATTN if role is Role.JOINT_ATTN_IMAGE else role
            assert _match(FALLBACK_PATTERNS, name) is expected, (cls_name, name)


SPOT_CHECKS = {
    "PixArtTransformer2DModel": {
        "transformer_blocks.0.attn1.to_v": Role.SELF_ATTN, "transformer_blocks.0.attn2.to_q": Role.CROSS_ATTN_Q,
        "transformer_blocks.0.attn2.to_k": Role.CROSS_ATTN_KV,
        "transformer_blocks.0.attn2.to_out.0": Role.CROSS_ATTN_OUT,
        "transformer_blocks.0.ff.net.0.proj": Role.FFN_UP, "adaln_single.linear": Role.MODULATION,
        "adaln_single.emb.timestep_embedder.linear_1": Role.EMBEDDER, "caption_projection.linear_2": Role.EMBEDDER,
        "proj_out": Role.OUTPUT},
    "DiTTransformer2DModel": {
        "transformer_blocks.0.norm1.linear": Role.MODULATION,
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2": Role.MODULATION,
        "proj_out_1": Role.OUTPUT, "proj_out_2": Role.OUTPUT},
    "SD3Transformer2DModel": {
        "transformer_blocks.0.attn.to_q": Role.JOINT_ATTN_IMAGE, "transformer_blocks.0.attn.add_k_proj":
        Role.JOINT_ATTN_CONTEXT, "transformer_blocks.0.attn.to_add_out": Role.JOINT_ATTN_CONTEXT,
        "transformer_blocks.0.ff_context.net.2": Role.FFN_CONTEXT, "transformer_blocks.1.norm1_context.linear":
        Role.MODULATION, "context_embedder": Role.EMBEDDER, "norm_out.linear": Role.OUTPUT},
    "FluxTransformer2DModel": {
        "single_transformer_blocks.0.attn.to_k": Role.SINGLE_ATTN, "single_transformer_blocks.0.proj_mlp":
        Role.SINGLE_MLP, "single_transformer_blocks.0.proj_out": Role.SINGLE_OUT,
        "single_transformer_blocks.0.norm.linear": Role.MODULATION, "x_embedder": Role.EMBEDDER,
        "transformer_blocks.0.attn.to_out.0": Role.JOINT_ATTN_IMAGE},
    "HunyuanVideoTransformer3DModel": {
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_q": Role.EMBEDDER,
        "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear": Role.EMBEDDER,
        "time_text_embed.guidance_embedder.linear_1": Role.EMBEDDER,
        "single_transformer_blocks.0.proj_out": Role.SINGLE_OUT, "transformer_blocks.0.attn.add_v_proj":
        Role.JOINT_ATTN_CONTEXT},
    "LatteTransformer3DModel": {
        "temporal_transformer_blocks.0.attn1.to_q": Role.TEMPORAL_ATTN,
        "temporal_transformer_blocks.0.attn1.to_out.0": Role.TEMPORAL_ATTN,
        "temporal_transformer_blocks.0.ff.net.2": Role.TEMPORAL_FFN, "transformer_blocks.0.attn1.to_q": Role.SELF_ATTN},
    "WanTransformer3DModel": {
        "blocks.1.ffn.net.0.proj": Role.FFN_UP, "blocks.1.ffn.net.2": Role.FFN_DOWN,
        "blocks.0.attn2.to_v": Role.CROSS_ATTN_KV, "condition_embedder.time_proj": Role.EMBEDDER},
    "QwenImageTransformer2DModel": {
        "transformer_blocks.1.img_mod.1": Role.MODULATION, "transformer_blocks.1.txt_mod.1": Role.MODULATION,
        "transformer_blocks.0.img_mlp.net.2": Role.FFN_DOWN, "transformer_blocks.0.txt_mlp.net.0.proj":
        Role.FFN_CONTEXT, "img_in": Role.EMBEDDER, "txt_in": Role.EMBEDDER},
    "MochiTransformer3DModel": {
        "transformer_blocks.0.attn1.to_k": Role.JOINT_ATTN_IMAGE, "transformer_blocks.0.attn1.add_q_proj":
        Role.JOINT_ATTN_CONTEXT, "transformer_blocks.1.norm1_context.linear_1": Role.MODULATION,
        "time_embed.pooler.to_kv": Role.EMBEDDER},
    "CogVideoXTransformer3DModel": {
        "transformer_blocks.1.norm2.linear": Role.MODULATION, "transformer_blocks.1.attn1.to_q": Role.SELF_ATTN,
        "patch_embed.text_proj": Role.EMBEDDER},
    "LTXVideoTransformer3DModel": {"proj_in": Role.EMBEDDER, "time_embed.linear": Role.MODULATION},
    "SanaVideoTransformer3DModel": {"transformer_blocks.1.attn2.to_k": Role.CROSS_ATTN_KV},
    "HunyuanDiT2DModel": {"time_extra_emb.pooler.q_proj": Role.EMBEDDER, "blocks.0.attn2.to_k": Role.CROSS_ATTN_KV},
}
VARIANT_CHECKS = {
    "SD3.5 dual attention": {"transformer_blocks.0.attn2.to_q": Role.SELF_ATTN},  # image-only 2nd attention
    "HunyuanDiT skip_linear": {"blocks.2.skip_linear": Role.SKIP_PROJ},
    "Wan I2V": {"blocks.0.attn2.add_k_proj": Role.CROSS_ATTN_KV,
                "condition_embedder.image_embedder.ff.net.0.proj": Role.EMBEDDER},
    "CogVideoX 1.5": {"patch_embed.proj": Role.EMBEDDER, "ofs_embedding.linear_1": Role.EMBEDDER},
}


@pytest.mark.parametrize("label", list(SPOT_CHECKS) + list(VARIANT_CHECKS))
def test_spot_checks(label):
    cls_name, overrides = VARIANTS.get(label, (label, {}))
    expected = SPOT_CHECKS.get(label) or VARIANT_CHECKS[label]
    roles = _classify_quietly(_build(cls_name, **overrides))
    assert {n: roles.get(n) for n in expected} == expected


def test_quantized_models_classify_the_same():
    model = ZOO["PixArtTransformer2DModel"].build()
    before = _classify_quietly(model)
    quantize(model, ViDiTQConfig(preset="w8a8"))
    assert any(isinstance(m, ViDiTQLinear) for m in model.modules())
    assert _classify_quietly(model) == before


def test_block_index():
    assert block_index("transformer_blocks.12.attn1.to_q") == 12
    assert block_index("single_transformer_blocks.3.proj_out") == 3
    assert block_index("context_embedder.token_refiner.refiner_blocks.0.attn.to_q") is None
    assert block_index("proj_out") is None


def _check_partition(model, groups):
    roles = _classify_quietly(model)
    names = [n for members in groups.values() for n in members]
    assert sorted(names) == sorted(roles)  # every classified linear exactly once
    quantized = {n for n, r in roles.items() if quantized_by_default(r)}
    q_groups = {g: m for g, m in groups.items() if all(n in quantized for n in m)}
    assert sorted(n for m in q_groups.values() for n in m) == sorted(quantized)
    for members in groups.values():  # a group holds one role
        assert len({roles[n] for n in members}) == 1
    return roles


def test_group_layers_two_ranges():
    model = _build("HunyuanDiT2DModel", num_layers=3)  # 3 blocks -> ranges [0-1], [2-2]
    groups = group_layers(model, block_ranges=2)
    _check_partition(model, groups)
    assert groups["ffn_down[0-1]"] == ["blocks.0.ff.net.2", "blocks.1.ff.net.2"]
    assert groups["ffn_down[2-2]"] == ["blocks.2.ff.net.2"]
    assert groups["skip_proj[2-2]"] == ["blocks.2.skip_linear"]
    assert groups["cross_attn_kv[0-1]"] == [f"blocks.{i}.attn2.{p}" for i in (0, 1) for p in ("to_k", "to_v")]
    assert "embedder" in groups and "output" in groups  # outside the blocks: role alone
    # explicit ranges give the same groups; a block outside every range is an error
    assert group_layers(model, [(0, 1), (2, 2)]) == groups
    with pytest.raises(ValueError, match="blocks.2"):
        group_layers(model, [(0, 1)])


def test_group_layers_several_block_lists():
    model = _build("FluxTransformer2DModel", num_layers=2, num_single_layers=4)
    groups = group_layers(model, block_ranges=2)
    _check_partition(model, groups)
    assert groups["joint_attn_context[1-1]"] == [f"transformer_blocks.1.attn.{p}" for p in (
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    assert groups["single_out[2-3]"] == ["single_transformer_blocks.2.proj_out", "single_transformer_blocks.3.proj_out"]
    # modulation occurs in both lists: the single-stream one is prefixed
    assert groups["modulation[0-0]"] == [
        "transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear"]
    assert groups["single_transformer_blocks/modulation[0-1]"] == [
        "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.1.norm.linear"]
    latte = group_layers(ZOO["LatteTransformer3DModel"].build(), block_ranges=2)
    assert latte["temporal_attn[0-0]"][0] == "temporal_transformer_blocks.0.attn1.to_q"
    assert set(group_layers(model, block_ranges=1)) >= {"ffn_up[0-1]", "single_mlp[0-3]"}


class _Block(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.attn1 = nn.Module()
        for p in ("to_q", "to_k", "to_v"):
            setattr(self.attn1, p, nn.Linear(dim, dim))
        self.attn1.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout()])
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.GELU(), nn.Linear(4 * dim, dim)])
        self.ff.net[0].proj = nn.Linear(dim, 4 * dim)
        self.norm1 = nn.Module()
        self.norm1.linear = nn.Linear(dim, 6 * dim)
        self.gate_router = nn.Linear(dim, 2)  # no pattern knows this one


class TinyCustomDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Linear(4, 8)
        self.transformer_blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.proj_out = nn.Linear(8, 4)


def test_unknown_class_falls_back_and_warns():
    model = TinyCustomDiT()
    with pytest.warns(UserWarning, match="no role map for TinyCustomDiT") as record:
        roles = classify(model)
    assert len(record) == 1
    message = str(record[0].message)
    assert "transformer_blocks.0.gate_router" in message and "transformer_blocks.1.gate_router" in message
    assert "ROLE_MAPS['TinyCustomDiT']" in message
    assert "transformer_blocks.0.gate_router" not in roles  # left out: stays FP
    assert roles["transformer_blocks.1.attn1.to_out.0"] is Role.SELF_ATTN
    assert roles["transformer_blocks.0.ff.net.0.proj"] is Role.FFN_UP
    assert roles["transformer_blocks.0.ff.net.2"] is Role.FFN_DOWN
    assert roles["transformer_blocks.0.norm1.linear"] is Role.MODULATION
    assert roles["x_embedder"] is Role.EMBEDDER and roles["proj_out"] is Role.OUTPUT
    with pytest.warns(UserWarning):
        groups = group_layers(model, block_ranges=2)
    assert groups["self_attn[1-1]"] == [f"transformer_blocks.1.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
