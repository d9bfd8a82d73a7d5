"""Counts and metadata as diffusers' other quantization backends report them: `num_parameters()` equals the
floating-point model's (a quantized weight counts as its `out x in` elements), `get_memory_footprint()` is the bytes
the model really holds, and `config._pre_quantization_dtype` is the dtype the weights had, also without
`torch_dtype` and after a save and reload."""

import copy
import json

import pytest
import torch
from torch import nn

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.testing.zoo import ZOO

MODELS = ["FluxTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel"]
PRESETS = ["w8a8", "w4a8", "w8a16"]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module", params=MODELS)
def fp_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "fp"
    ZOO[request.param].build(seed=0).save_pretrained(path)
    return ZOO[request.param], path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", PRESETS)
def test_num_parameters_equal_the_floating_point_model(fp_dir, preset, dtype):
    entry, path = fp_dir
    fp = entry.cls.from_pretrained(path, torch_dtype=dtype)
    model = entry.cls.from_pretrained(path, torch_dtype=dtype, quantization_config=ViDiTQConfig(preset=preset))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ViDiTQLinear)}
    assert layers
    assert model.num_parameters() == fp.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == fp.num_parameters(exclude_embeddings=True)
    # the quantized weights and their biases are frozen, however the model was quantized; the rest is trainable
    frozen = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                 for m in layers.values())
    assert model.num_parameters(only_trainable=True) == fp.num_parameters(only_trainable=True) - frozen
    assert quantize(entry.cls.from_pretrained(path, torch_dtype=dtype), ViDiTQConfig(preset=preset)).num_parameters(
        only_trainable=True) == model.num_parameters(only_trainable=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_memory_footprint_is_the_bytes_held(fp_dir, preset):
    """The FP model's bytes, minus each planned layer's float weight, plus its codes, scales and zero points."""
    entry, path = fp_dir
    fp = entry.cls.from_pretrained(path)
    model = entry.cls.from_pretrained(path, quantization_config=ViDiTQConfig(preset=preset))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ViDiTQLinear)}
    replaced = sum(fp.get_submodule(n).weight.numel() * 4 for n in layers)
    stored = sum(m.weight_bytes() for m in layers.values())
    assert model.get_memory_footprint() == fp.get_memory_footprint() - replaced + stored
    assert model.get_memory_footprint() == tensor_bytes(list(model.parameters()) + list(model.buffers()))
    assert model.get_memory_footprint(return_buffers=False) == tensor_bytes(model.parameters())
    assert model.get_memory_footprint() < fp.get_memory_footprint()


def test_counts_follow_a_copy_and_end_with_dequantize(fp_dir):
    entry, path = fp_dir
    fp_count = entry.cls.from_pretrained(path).num_parameters()
    model = entry.cls.from_pretrained(path, quantization_config=ViDiTQConfig(preset="w4a8"))
    twin = copy.deepcopy(model)
    name = next(n for n, m in twin.named_modules() if isinstance(m, ViDiTQLinear))
    parent, _, leaf = name.rpartition(".")
    setattr(twin.get_submodule(parent), leaf, nn.Identity())  # the copy counts its own layers
    assert model.num_parameters() == fp_count and twin.num_parameters() < fp_count
    model.dequantize()
    assert "num_parameters" not in model.__dict__ and model.num_parameters() == fp_count
    assert "_pre_quantization_dtype" not in model.config


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_pre_quantization_dtype_set_saved_and_reloaded(fp_dir, dtype, tmp_path):
    entry, path = fp_dir
    model = entry.cls.from_pretrained(path, torch_dtype=dtype, quantization_config=ViDiTQConfig(preset="w8a8"))
    expected = dtype or torch.float32  # without torch_dtype diffusers loads in torch's default dtype
    assert model.config._pre_quantization_dtype == expected
    assert {m.weight.dtype for m in model.modules() if isinstance(m, ViDiTQLinear)} == {expected}
    json.loads(model.config.quantization_config.to_json_string())
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["plan"]["dtype"] == str(expected).removeprefix("torch.")
    assert "_pre_quantization_dtype" not in saved  # diffusers never writes the torch.dtype itself
    reloaded = entry.cls.from_pretrained(tmp_path / "q")
    assert reloaded.config._pre_quantization_dtype == expected
    assert {p.dtype for p in reloaded.parameters() if p.is_floating_point()} <= {expected, torch.float32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pre_quantization_dtype_of_a_loaded_model(dtype):
    """`quantize(model, config)` records the dtype the model was in."""
    model = quantize(ZOO["PixArtTransformer2DModel"].build(seed=0).to(dtype), ViDiTQConfig(preset="w4a8"))
    assert model.config._pre_quantization_dtype == dtype
    assert model.num_parameters() == ZOO["PixArtTransformer2DModel"].build(seed=0).num_parameters()
