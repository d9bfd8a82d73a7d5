"""`fuse_qkv_projections()` / `unfuse_qkv_projections()` on quantized models: one quantized QKV layer built from the
three layers' codes, bit-identical to the three; a clear error where one layer cannot be exact."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.fuse_qkv import fused_quantized
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.testing.zoo import ZOO, run

MODELS = ["FluxTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel"]
CONFIGS = {
    "w8a8": dict(preset="w8a8"),
    "w4a8": dict(preset="w4a8"),
    "w4a8-g16-sym": dict(preset="w4a8", group_size=16, weight_symmetric=True),
    "w8a16": dict(preset="w8a16"),
    "w4a8-timestep-wise": dict(preset="w4a8", early_weight_bits=8, early_timestep=500.0),
}
FUSED = ("to_qkv", "to_kv", "to_added_qkv")


def count_calls(model, suffixes):
    calls = {}
    for name, module in model.named_modules():
        if name.endswith(suffixes):
            calls[name] = 0
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("cls_name", MODELS)
def test_fused_model_is_bit_identical(cls_name, config):
    entry = ZOO[cls_name]
    model = quantize(entry.build(seed=0), ViDiTQConfig(**CONFIGS[config]))
    inputs = [entry.make_inputs(seed) for seed in (0, 1)]
    with torch.no_grad():
        before = [run(model, x) for x in inputs]
        model.fuse_qkv_projections()
        fused = {n: m for n, m in model.named_modules() if n.endswith(FUSED)}
        assert fused and all(type(m) is ViDiTQLinear for m in fused.values())
        calls = count_calls(model, FUSED)
        after = [run(model, x) for x in inputs]
        assert all(calls.values()), f"fused layers not run: {calls}"  # the processors use the fused layers
        for a, b in zip(before, after):
            assert torch.equal(a, b)
        model.unfuse_qkv_projections()
        separate = count_calls(model, (".to_q", ".to_k", ".to_v"))
        for x, a in zip(inputs, before):
            assert torch.equal(run(model, x), a)
        assert all(separate.values()), "unfused, the three layers run again"


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, False), (4, None, True), (4, 16, False), (8, 16, True)])
def test_fused_layer_is_the_three_layers_side_by_side(bits, group, symmetric):
    torch.manual_seed(0)
    linears = [nn.Linear(64, n) for n in (32, 48, 32)]
    layers = [ViDiTQLinear.from_linear(lin, LayerSpec.for_linear(lin, bits, 8, group, symmetric)) for lin in linears]
    fused = fused_quantized(["q", "k", "v"], layers)
    assert fused.out_features == 112 and fused.spec.label() == layers[0].spec.label()
    x = torch.randn(5, 64)
    x[1, 3], x[2, 7], x[3, 0] = float("nan"), float("inf"), -float("inf")  # non-finite rows stay as they are
    with torch.no_grad():
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0, equal_nan=True)


def test_per_tensor_static_layers_fuse_exactly():
    """The naive baseline: one weight scale per layer (repeated per output channel) and one static activation
    scale shared by q, k and v."""
    torch.manual_seed(0)
    linears = [nn.Linear(32, 32) for _ in range(3)]
    layers = [ViDiTQLinear.from_linear(lin, LayerSpec.for_linear(lin, 8, 8, weight_per_tensor=True, act_scale=0.02))
              for lin in linears]
    fused = fused_quantized(["q", "k", "v"], layers)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_different_smoothing_factors_are_refused():
    torch.manual_seed(0)
    linears = [nn.Linear(32, 32) for _ in range(3)]
    layers = [ViDiTQLinear.from_linear(lin, LayerSpec.for_linear(lin, 8, 8, smooth_alpha=0.5),
                                       smoothing=torch.rand(32) + 0.5) for lin in linears]
    with pytest.raises(ValueError, match=r"'a.to_q', 'a.to_k', 'a.to_v' cannot be fused into one quantized layer "
                                         r"with the same outputs: 'a.to_q' and 'a.to_k' smooth their input with "
                                         r"different factors.*Fix: quantize these projections with one recipe"):
        fused_quantized(["a.to_q", "a.to_k", "a.to_v"], layers)
    same = [ViDiTQLinear.from_linear(lin, LayerSpec.for_linear(lin, 8, 8, smooth_alpha=0.5),
                                     smoothing=torch.full((32,), 1.5)) for lin in linears]
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(fused_quantized(["q", "k", "v"], same)(x), torch.cat([m(x) for m in same], dim=-1))


@pytest.mark.parametrize("cls_name", MODELS)
def test_rotated_projections_are_refused_and_nothing_changes(cls_name):
    """`rotate_*` presets rotate each layer with its own seed: no single layer gives the three outputs."""
    entry = ZOO[cls_name]
    model = quantize(entry.build(seed=0), ViDiTQConfig(preset="rotate_w8a8"))
    with torch.no_grad():
        before = run(model, entry.make_inputs(0))
    with pytest.raises(ValueError, match=r"fuse_qkv_projections: '[\w.]+\.to_q', '[\w.]+\.to_k', '[\w.]+\.to_v' "
                                         r"cannot be fused .*has rotation_seed=\d+ and .*has rotation_seed=\d+.*Fix"):
        model.fuse_qkv_projections()
    assert not [n for n, _ in model.named_modules() if n.endswith(FUSED)]
    assert not any(getattr(m, "fused_projections", False) for m in model.modules())
    if cls_name != "FluxTransformer2DModel":  # PixArt / SD3 restore their processors themselves
        model.unfuse_qkv_projections()
    with torch.no_grad():
        assert torch.equal(run(model, entry.make_inputs(0)), before)


def test_quantized_and_float_projections_are_refused(tmp_path):
    entry = ZOO["FluxTransformer2DModel"]
    model = quantize(entry.build(seed=0), ViDiTQConfig(modules_to_not_convert=["to_k"]))
    with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.attn\.to_q' is a ViDiTQLinear, "
                                         r"'transformer_blocks\.0\.attn\.to_k' is a Linear.*Fix: quantize all of them "
                                         r"or keep all of them in floating point"):
        model.fuse_qkv_projections()


def test_float_attention_next_to_quantized_ones():
    """PixArt with the cross-attention kept in floating point: it fuses as diffusers fuses it, attn1 quantized."""
    entry = ZOO["PixArtTransformer2DModel"]
    model = quantize(entry.build(seed=0), ViDiTQConfig(modules_to_not_convert=["attn2"]))
    with torch.no_grad():
        before = run(model, entry.make_inputs(0))
        model.fuse_qkv_projections()
        block = model.transformer_blocks[0]
        assert type(block.attn1.to_qkv) is ViDiTQLinear and type(block.attn2.to_kv) is nn.Linear
        assert torch.allclose(run(model, entry.make_inputs(0)), before, rtol=1e-5, atol=1e-6)


def test_a_fused_model_saves_as_the_unfused_one(tmp_path):
    entry = ZOO["SD3Transformer2DModel"]
    entry.build(seed=0).save_pretrained(tmp_path / "fp")
    model = entry.cls.from_pretrained(tmp_path / "fp", quantization_config=ViDiTQConfig(preset="w4a8"))
    inputs = entry.make_inputs(0)
    with torch.no_grad():
        before = run(model, inputs)
    model.fuse_qkv_projections()
    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if any(f".{name}." in k for name in FUSED)]
    assert "to_qkv" not in json.dumps(json.loads((tmp_path / "q" / "config.json").read_text()))
    reloaded = entry.cls.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(run(reloaded, inputs), before)
        reloaded.fuse_qkv_projections()
        assert torch.equal(run(reloaded, inputs), before)


def test_lora_wrapped_projections_are_refused():
    """A fused layer built from the base codes would silently drop the adapter."""
    from peft import LoraConfig

    entry = ZOO["FluxTransformer2DModel"]
    model = quantize(entry.build(seed=0), ViDiTQConfig())
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"]))
    with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.attn\.to_q' is a ViDiTQLoraLinear.*a LoRA \(or "
                                         r"another wrapper\) would be lost\. Fix: fuse_lora\(\) then unload_lora\(\)"):
        model.fuse_qkv_projections()


def test_dequantize_a_fused_model():
    """The fused layers become float layers too: nothing quantized is left behind."""
    entry = ZOO["PixArtTransformer2DModel"]
    model = quantize(entry.build(seed=0), ViDiTQConfig(preset="w8a16"))
    inputs = entry.make_inputs(0)
    with torch.no_grad():
        quantized = run(model, inputs)
        model.fuse_qkv_projections()
        model.dequantize()
        assert not any(isinstance(m, ViDiTQLinear) for m in model.modules())
        assert type(model.transformer_blocks[0].attn1.to_qkv) is nn.Linear
        assert torch.allclose(run(model, inputs), quantized, rtol=1e-4, atol=1e-5)
