"""`<Model>.from_single_file(file, config=folder, quantization_config=ViDiTQConfig(...))` on files in the models'
original key layouts (PixArt, SD3, Flux, Wan 2.1) equals `from_pretrained(folder, quantization_config=...)` of the
same weights, bit for bit: the same plan, the same integer codes and scales, the same output.

The files are written by `tests/support/original_layouts.py` (the inverse of the loaders' key conversions) from tiny
zoo models; `config` is the model's diffusers folder, so nothing is fetched from the hub.
"""

import os

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from tests.support.original_layouts import TO_ORIGINAL
from viditq_diffusers import ViDiTQConfig, ViDiTQLinear
from viditq_diffusers.convert import own_aligned_memory
from viditq_diffusers.plan import plan_to_json
from viditq_diffusers.single_file import convert_flux_any_size
from viditq_diffusers.testing.zoo import ZOO, _reinit_zero_params, run

FAMILIES = sorted(TO_ORIGINAL)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=[(f, d) for f in FAMILIES for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def files(request, tmp_path_factory):
    """(entry, dtype, diffusers folder, original-layout single file) of one tiny model."""
    family, dtype_name = request.param
    entry, dtype = ZOO[family], DTYPES[dtype_name]
    folder = tmp_path_factory.mktemp(f"{family}-{dtype_name}")
    model = entry.build(seed=0).to(dtype)
    model.save_pretrained(folder)
    single = os.path.join(folder, "original.safetensors")
    save_file(TO_ORIGINAL[family](model.state_dict()), single)
    return entry, dtype, str(folder), single


def load_single(entry, single, folder, **kwargs):
    return entry.cls.from_single_file(single, config=folder, local_files_only=True, **kwargs)


def output(entry, model, dtype):
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in entry.make_inputs(1).items()}
    with torch.no_grad():
        return run(model, inputs)


def test_original_layout_file_loads_the_same_fp_weights(files):
    """The inverse conversion is right: the FP model from the single file equals the one from the folder."""
    entry, dtype, folder, single = files
    a = load_single(entry, single, folder, torch_dtype=dtype)
    # diffusers' FP from_single_file ends with model.to(torch_dtype), which also casts buffers (PixArt's
    # sin-cos pos_embed) that from_pretrained keeps in float32: do the same here
    b = entry.cls.from_pretrained(folder, torch_dtype=dtype).to(dtype)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    for model in (a, b):  # CPU BLAS rounds by pointer alignment: mmap'ed weights sit at other offsets
        own_aligned_memory(model)
    assert torch.equal(output(entry, a, dtype), output(entry, b, dtype))


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_single_file_quantizes_like_from_pretrained(files, preset):
    entry, dtype, folder, single = files
    a = load_single(entry, single, folder, torch_dtype=dtype, quantization_config=ViDiTQConfig(preset=preset))
    b = entry.cls.from_pretrained(folder, torch_dtype=dtype, quantization_config=ViDiTQConfig(preset=preset))
    plan_a, plan_b = a.config.quantization_config.plan, b.config.quantization_config.plan
    assert plan_a["layers"] and plan_to_json(plan_a) == plan_to_json(plan_b)
    assert all(isinstance(a.get_submodule(name), ViDiTQLinear) for name in plan_a["layers"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)  # codes, scales, FP layers
    assert torch.equal(output(entry, a, dtype), output(entry, b, dtype))


def test_single_file_model_saves_and_reloads(files, tmp_path):
    """What from_single_file quantized is an ordinary quantized model: it saves, and reloads without the config."""
    entry, dtype, folder, single = files
    if dtype != torch.float32 or entry.cls_name != "FluxTransformer2DModel":
        pytest.skip("one family and dtype is enough for the save path; the load path is the same for all")
    a = load_single(entry, single, folder, quantization_config=ViDiTQConfig(preset="w8a8"))
    a.save_pretrained(tmp_path)
    b = entry.cls.from_pretrained(tmp_path)
    assert torch.equal(output(entry, a, dtype), output(entry, b, dtype))


def test_pixart_single_file_needs_a_config(files):
    entry, dtype, folder, single = files
    if entry.cls_name != "PixArtTransformer2DModel" or dtype != torch.float32:
        pytest.skip("PixArt only")
    with pytest.raises(ValueError, match=r"PixArtTransformer2DModel\.from_single_file needs config="):
        entry.cls.from_single_file(single, quantization_config=ViDiTQConfig(preset="w8a8"))


def test_quantized_file_is_refused_with_the_fix(tmp_path):
    """A ViDiT-Q quantized weights file is not an original-layout FP file: the error says to use from_pretrained."""
    entry = ZOO["SD3Transformer2DModel"]
    fp = tmp_path / "fp"
    entry.build(seed=0).save_pretrained(fp)
    entry.cls.from_pretrained(fp, quantization_config=ViDiTQConfig(preset="w8a8")).save_pretrained(tmp_path / "q")
    weights = str(tmp_path / "q" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"already ViDiT-Q quantized.*from_pretrained\(folder\) without quantiz"):
        entry.cls.from_single_file(weights, config=str(fp), quantization_config=ViDiTQConfig(preset="w8a8"))


def flux1_original_on_meta(double: int = 1, single: int = 1, guidance: bool = True) -> dict:
    """A Flux.1-dev-sized original-layout state dict on the meta device (keys and shapes, no memory)."""
    dim, mlp, ctx, vec, heads_dim = 3072, 12288, 4096, 768, 128
    sd = {}

    def lin(name, out_f, in_f, bias=True):
        sd[f"{name}.weight"] = torch.empty(out_f, in_f, device="meta")
        if bias:
            sd[f"{name}.bias"] = torch.empty(out_f, device="meta")

    lin("img_in", dim, 64), lin("txt_in", dim, ctx)
    for emb, width in (("time_in", 256), ("vector_in", vec)) + ((("guidance_in", 256),) if guidance else ()):
        lin(f"{emb}.in_layer", dim, width), lin(f"{emb}.out_layer", dim, dim)
    for i in range(double):
        for s in ("img", "txt"):
            lin(f"double_blocks.{i}.{s}_mod.lin", 6 * dim, dim), lin(f"double_blocks.{i}.{s}_attn.qkv", 3 * dim, dim)
            lin(f"double_blocks.{i}.{s}_attn.proj", dim, dim)
            lin(f"double_blocks.{i}.{s}_mlp.0", mlp, dim), lin(f"double_blocks.{i}.{s}_mlp.2", dim, mlp)
            for n in ("query_norm", "key_norm"):
                sd[f"double_blocks.{i}.{s}_attn.norm.{n}.scale"] = torch.empty(heads_dim, device="meta")
    for i in range(single):
        lin(f"single_blocks.{i}.modulation.lin", 3 * dim, dim), lin(f"single_blocks.{i}.linear1", 3 * dim + mlp, dim)
        lin(f"single_blocks.{i}.linear2", dim, dim + mlp)
        for n in ("query_norm", "key_norm"):
            sd[f"single_blocks.{i}.norm.{n}.scale"] = torch.empty(heads_dim, device="meta")
    lin("final_layer.linear", 64, dim), lin("final_layer.adaLN_modulation.1", 2 * dim, dim)
    return sd


def test_flux_any_size_conversion_agrees_with_diffusers_at_flux1_size():
    """At the only size diffusers' Flux conversion handles, ours gives the same keys and shapes."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    theirs = convert_flux_transformer_checkpoint_to_diffusers(flux1_original_on_meta())
    ours = convert_flux_any_size(flux1_original_on_meta())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_flux1_sized_files_still_use_diffusers_conversion():
    """The wrapped Flux mapping hands Flux.1-sized files to diffusers' own function (same key order and all)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    mapping = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]["checkpoint_mapping_fn"]
    assert list(mapping(flux1_original_on_meta())) == list(
        convert_flux_transformer_checkpoint_to_diffusers(flux1_original_on_meta()))
    assert diffusers.PixArtTransformer2DModel.from_single_file  # registered on import of viditq_diffusers


def _micro_conditions(inputs):  # PixArt-α at 1024 px embeds the image size and aspect ratio
    return {**inputs, "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 64.0]] * 2),
                                            "aspect_ratio": torch.tensor([[1.0]] * 2)}}


def _with_guidance(inputs):  # Flux.1-dev embeds the guidance scale
    return {**inputs, "guidance": torch.tensor([3.5])}


def _pixart_extras(original, model):
    """The original's fixed sin-cos position table and its null caption embedding, which diffusers has no use for."""
    return {**original, "pos_embed": torch.randn(1, 16, 32), "y_embedder.y_embedding": torch.randn(8, 32)}


def _image_condition(inputs):  # Wan 2.1 I2V: 512 text tokens (fixed by diffusers' attention) after image tokens
    g = torch.Generator().manual_seed(2)
    return {**inputs, "encoder_hidden_states": torch.randn(1, 512, 32, generator=g),
            "encoder_hidden_states_image": torch.randn(1, 4, 32, generator=g)}


# variant -> (zoo family, model kwargs over the zoo's, inputs change, original-file change, key prefix)
VARIANTS = {
    "pixart-micro-conditions": (  # the size embeddings split the width in 3: 48 wide
        "PixArtTransformer2DModel",
        {"use_additional_conditions": True, "num_attention_heads": 3, "cross_attention_dim": 48},
        _micro_conditions, None, ""),
    "pixart-comfyui-with-pos-embed": ("PixArtTransformer2DModel", {}, None, _pixart_extras, "model.diffusion_model."),
    "sd35-qk-norm-dual-attention": ("SD3Transformer2DModel", {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
                                    None, None, ""),
    "sd3-comfyui": ("SD3Transformer2DModel", {}, None, None, "model.diffusion_model."),
    "flux-dev-guidance": ("FluxTransformer2DModel", {"guidance_embeds": True}, _with_guidance, None, ""),
    "flux-comfyui": ("FluxTransformer2DModel", {}, None, None, "model.diffusion_model."),
    "wan-comfyui": ("WanTransformer3DModel", {}, None, None, "model.diffusion_model."),
    "wan-i2v": ("WanTransformer3DModel", {"image_dim": 32, "added_kv_proj_dim": 32}, _image_condition, None, ""),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layout_variants(variant, tmp_path):
    """Files as they come: ComfyUI's key prefix, extra tensors of the original, optional parts of each family."""
    family, overrides, change_inputs, change_file, prefix = VARIANTS[variant]
    entry = ZOO[family]
    torch.manual_seed(0)
    model = entry.cls(**{**entry.kwargs, **overrides}).eval()
    _reinit_zero_params(model, seed=0)  # no all-zero adaLN / output layer that would hide a wrong mapping
    model.save_pretrained(tmp_path)
    original = TO_ORIGINAL[family](model.state_dict())
    original = change_file(original, model) if change_file else original
    single = str(tmp_path / "original.safetensors")
    save_file({prefix + k: v for k, v in original.items()}, single)
    inputs = (change_inputs or (lambda x: x))(entry.make_inputs(1))
    fp = load_single(entry, single, str(tmp_path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fp.state_dict().items())
    assert sorted(fp.state_dict()) == sorted(model.state_dict())
    a = load_single(entry, single, str(tmp_path), quantization_config=ViDiTQConfig(preset="w8a8"))
    b = entry.cls.from_pretrained(tmp_path, quantization_config=ViDiTQConfig(preset="w8a8"))
    assert plan_to_json(a.config.quantization_config.plan) == plan_to_json(b.config.quantization_config.plan)
    with torch.no_grad():
        assert torch.equal(run(a, inputs), run(b, inputs))
