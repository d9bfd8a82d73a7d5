"""Bad input gets a clear error that names the problem and the fix."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.cli import main as cli
from viditq_diffusers.testing.zoo import ZOO, run

PIXART = ZOO["PixArtTransformer2DModel"]


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "pixart"
    PIXART.build(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def q_dir(fp_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "pixart-w8a8"
    PIXART.cls.from_pretrained(fp_dir, quantization_config=ViDiTQConfig()).save_pretrained(path)
    return path


def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"Unknown preset 'w3a3'\. Choose one of: w8a8, w4a8"):
        ViDiTQConfig(preset="w3a3")


@pytest.mark.parametrize("kwargs", [dict(weight_bits=6), dict(act_bits=2), dict(weight_bits=16)])
def test_bits_other_than_4_and_8(kwargs):
    with pytest.raises(ValueError, match=r"must be one of \{4, 8(, 16)?\}, got \d+; ViDiT-Q quantizes to 4 or 8 bits"):
        ViDiTQConfig(**kwargs)


def test_one_name_as_a_string_is_one_name(fp_dir):
    """`modules_to_not_convert="transformer_blocks.0.attn2"` keeps that module in floating point (it was once split into
    characters and silently ignored); `components` reads a string the same way."""
    from viditq_diffusers import ViDiTQLinear

    config = ViDiTQConfig(modules_to_not_convert="transformer_blocks.0.attn2", components="transformer")
    assert (config.modules_to_not_convert, config.components) == (["transformer_blocks.0.attn2"], ["transformer"])
    model = PIXART.cls.from_pretrained(fp_dir, quantization_config=config)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, ViDiTQLinear))}
    kept = [kind for name, kind in kinds.items() if name.startswith("transformer_blocks.0.attn2.")]
    assert kept and all(kind is torch.nn.Linear for kind in kept)
    assert any(kind is ViDiTQLinear for kind in kinds.values())


@pytest.mark.parametrize("argument", ["modules_to_not_convert", "components"])
def test_names_must_be_strings(argument):
    with pytest.raises(TypeError, match=f"{argument} takes names"):
        ViDiTQConfig(**{argument: ["proj_out", 3]})


def test_group_size_must_divide(fp_dir):
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=32 of layer "
                                         r"'transformer_blocks\.0\.attn1\.to_q'"):
        PIXART.cls.from_pretrained(fp_dir, quantization_config=ViDiTQConfig(preset="w4a8", group_size=48))


def test_quantize_twice(fp_dir):
    model = quantize(PIXART.cls.from_pretrained(fp_dir), ViDiTQConfig())
    with pytest.raises(ValueError, match="already quantized.*Load the floating-point model again"):
        quantize(model, ViDiTQConfig(preset="w4a8"))


def test_quantized_checkpoint_without_its_config_never_loads_codes_as_floats(q_dir, tmp_path):
    path = copy_checkpoint(q_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    # diffusers refuses: the quantized layers' `weight` is an empty marker, not [out, in] floats
    with pytest.raises(ValueError, match=r"attn1\.to_\w+\.weight expected shape torch\.Size\(\[32, 32\]\), "
                                         r"but got torch\.Size\(\[0\]\)"):
        PIXART.cls.from_pretrained(path)
    # and so does torch for a plain state-dict load
    fp_model = PIXART.build()
    quantized = PIXART.cls.from_pretrained(q_dir)
    with pytest.raises(RuntimeError, match="size mismatch for transformer_blocks.0.attn1.to_q.weight"):
        fp_model.load_state_dict(quantized.state_dict())


def test_fp_checkpoint_with_a_plan_in_its_config(fp_dir, q_dir, tmp_path):
    path = copy_checkpoint(fp_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = json.loads((q_dir / "config.json").read_text())["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks .* quantized tensor.*floating-point checkpoint"):
        PIXART.cls.from_pretrained(path)


@pytest.mark.parametrize("change", ["extra", "not-linear", "shape"])
def test_plan_that_does_not_match_the_architecture(fp_dir, q_dir, change):
    plan = json.loads((q_dir / "config.json").read_text())["quantization_config"]["plan"]
    layers = plan["layers"]
    if change == "extra":  # the plan names a layer the model does not have
        layers["transformer_blocks.7.attn1.to_q"] = layers["transformer_blocks.0.attn1.to_q"]
        expected = r"transformer_blocks\.7\.attn1\.to_q: no such layer"
    elif change == "not-linear":
        layers["pos_embed.proj"] = dict(layers["transformer_blocks.0.attn1.to_q"])
        expected = r"pos_embed\.proj: is a Conv2d, not a linear layer"
    else:
        layers["transformer_blocks.0.ff.net.2"]["in_features"] = 64
        expected = r"transformer_blocks\.0\.ff\.net\.2: plan says 64->32 features, model has 128->32"
    with pytest.raises(ValueError, match=r"(?s)does not match PixArtTransformer2DModel.*" + expected):
        PIXART.cls.from_pretrained(fp_dir, quantization_config=ViDiTQConfig(plan=plan))


def test_checkpoint_plan_missing_a_quantized_layer(q_dir, tmp_path):
    path = copy_checkpoint(q_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]["plan"]["layers"]["transformer_blocks.0.attn1.to_v"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantized tensors for 1 layer\(s\) that the plan .* does not list "
                                         r"\(e\.g\. 'transformer_blocks\.0\.attn1\.to_v'\)"):
        PIXART.cls.from_pretrained(path)


def test_truncated_safetensors(q_dir, tmp_path, capsys):
    path = copy_checkpoint(q_dir, tmp_path)
    file = path / "diffusion_pytorch_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError,
                       match="Unable to load weights from checkpoint file .*diffusion_pytorch_model.safetensors"):
        PIXART.cls.from_pretrained(path)
    assert cli(["info", str(path)]) == 1  # a runtime error: the command line is fine, the file is not
    assert "is not a valid safetensors file" in capsys.readouterr().err


def test_truncated_shard(fp_dir, tmp_path):
    model = PIXART.cls.from_pretrained(fp_dir, quantization_config=ViDiTQConfig())
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"is not a valid safetensors file .*truncated or corrupt\. Re-download it"):
        PIXART.cls.from_pretrained(tmp_path / "sharded")


def test_nan_weight_names_the_layer(fp_dir):
    model = PIXART.cls.from_pretrained(fp_dir)
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'transformer_blocks\.0\.ff\.net\.2' has NaN or Inf"):
        quantize(model, ViDiTQConfig())


def test_inf_weight_in_checkpoint_names_the_layer(fp_dir, tmp_path):
    model = PIXART.cls.from_pretrained(fp_dir)
    with torch.no_grad():
        model.transformer_blocks[0].attn2.to_v.weight[1, 2] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError,
                       match=r"layer 'transformer_blocks\.0\.attn2\.to_v' has NaN or Inf.*modules_to_not_convert"):
        PIXART.cls.from_pretrained(tmp_path / "bad", quantization_config=ViDiTQConfig())


def test_half_cast_is_refused_and_model_still_works(q_dir):
    model = PIXART.cls.from_pretrained(q_dir)
    inputs = PIXART.make_inputs(0)
    with torch.no_grad():
        before = run(model, inputs)
    for cast in (lambda: model.to(torch.float16), lambda: model.half(), lambda: model.to("cpu", torch.bfloat16)):
        with pytest.raises(ValueError, match="(Casting a quantized model to a new `dtype` is unsupported"
                                             "|`.half\\(\\)` is not supported)"):
            cast()
    with torch.no_grad():
        assert torch.equal(run(model, inputs), before)
    # the supported way to get a 16-bit model: torch_dtype at load time (scales stay fp32)
    half = PIXART.cls.from_pretrained(q_dir, torch_dtype=torch.float16)
    assert half.transformer_blocks[0].attn1.to_q.scales().dtype == torch.float32
    with torch.no_grad():
        out = run(half, {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()})
    assert out.dtype == torch.float16 and ((out.float() - before).norm() / before.norm()) < 0.02


def test_model_with_no_quantizable_layers(tmp_path):
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    with pytest.raises(ValueError,
                       match="AutoencoderKL has no quantizable layers.*Pass a model with transformer blocks"):
        quantize(vae, ViDiTQConfig())
    model = PIXART.build()
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize(model, ViDiTQConfig(modules_to_not_convert=["transformer_blocks"]))
