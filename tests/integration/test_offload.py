"""Device maps with "cpu" / "disk" entries (accelerate's offload) and diffusers' group offloading on quantized models.

Every offloaded model must give the same output, bit for bit, as the same model loaded without offload, on both
load paths: quantizing a floating-point checkpoint as it loads, and loading a saved ViDiT-Q checkpoint. What goes
to the offload folder for a planned layer is its integer tensors, never its float weight.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear
from viditq_diffusers.calibration import calibrate
from viditq_diffusers.testing.zoo import ZOO, run

PIXART = ZOO["PixArtTransformer2DModel"]  # one block: transformer_blocks.0, 10 planned layers
INPUTS = PIXART.make_inputs(0)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def configs(stats):
    """Plans that put every kind of tensor a ViDiTQLinear stores in the offload folder."""
    return {
        "w8a8": lambda: ViDiTQConfig(preset="w8a8"),
        # W4 (packed uint8 codes), groups of 32, rotation, a timestep-wise W8 copy (early_* tensors)
        "w4a8_group_rotate_early": lambda: ViDiTQConfig(preset="rotate_w4a8", group_size=32, early_weight_bits=8),
        # smoothing factors (act_smooth) from calibration statistics
        "w8a8_smooth": lambda: ViDiTQConfig(preset="smooth_w8a8", calibration=stats),
    }


def device_map(model, offloaded: dict[str, str], rest: str = "cpu") -> dict[str, str]:
    """A flat map (as device_map="auto" makes, and as accelerate needs): the modules in `offloaded` get their
    device; every module on the way to one of them is split into its children (and direct parameters); all
    else gets `rest`."""
    result = {}

    def visit(module, prefix):
        names = [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)]
        for name in names:
            full = prefix + name
            if full in offloaded:
                result[full] = offloaded[full]
            elif any(key.startswith(full + ".") for key in offloaded):
                visit(module.get_submodule(name), full + ".")
            else:
                result[full] = rest

    visit(model, "")
    return result


# the offloaded part of each map: a whole block, a quantized layer's parent (and a quantized layer itself),
# modules with no quantized layer, and a map that keeps the rest of a block in memory
MAPS = {
    "block_on_disk": {"transformer_blocks.0": "disk"},
    "parent_of_quantized_on_disk": {"transformer_blocks.0.attn1": "disk", "transformer_blocks.0.ff.net.2": "disk"},
    "unquantized_on_disk": {"proj_out": "disk", "adaln_single": "disk"},
    "all_blocks_and_embedders_on_disk": {"transformer_blocks": "disk", "pos_embed": "disk",
                                         "caption_projection": "disk"},
}


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "pixart"
    PIXART.build(0).save_pretrained(path, max_shard_size="40KB")  # shards: a layer's weight and bias may part
    return str(path)


@pytest.fixture(scope="module")
def stats():
    model = PIXART.build(0)
    return calibrate(model, ["x"], guidance_scale=1.0, run=lambda prompt, generator: model(**INPUTS))


@pytest.fixture(scope="module")
def quantized(fp_dir, stats, tmp_path_factory):
    """{config name: (checkpoint directory, output of the model loaded without offload)}."""
    found = {}
    for name, config in configs(stats).items():
        model = PIXART.cls.from_pretrained(fp_dir, quantization_config=config())
        path = tmp_path_factory.mktemp(name) / "q"
        model.save_pretrained(path)
        with torch.no_grad():
            found[name] = (str(path), run(model, INPUTS))
    return found


def load(fp_dir, quantized, stats, config, path_kind, **kwargs):
    if path_kind == "quantize_fp":
        return PIXART.cls.from_pretrained(fp_dir, quantization_config=configs(stats)[config](), **kwargs)
    return PIXART.cls.from_pretrained(quantized[config][0], **kwargs)


@pytest.mark.parametrize("path_kind", ["quantize_fp", "prequantized"])
@pytest.mark.parametrize("config", ["w8a8", "w4a8_group_rotate_early", "w8a8_smooth"])
@pytest.mark.parametrize("offloaded", MAPS, ids=str)
def test_offload_map_is_bit_identical(fp_dir, quantized, stats, config, path_kind, offloaded, tmp_path):
    folder = tmp_path / "offload"
    dmap = device_map(PIXART.build(0), MAPS[offloaded])
    model = load(fp_dir, quantized, stats, config, path_kind, device_map=dmap, offload_folder=str(folder))
    plan = model.config.quantization_config.plan["layers"]
    assert all(isinstance(model.get_submodule(name), ViDiTQLinear) for name in plan)
    with torch.no_grad():
        first, second = run(model, INPUTS), run(model, INPUTS)  # the hooks load the tensors again each call
    reference = quantized[config][1]
    assert torch.equal(first, reference) and torch.equal(second, reference)

    # the offload folder holds the integer tensors of the planned layers on disk, and no float weight of them
    index = json.loads((folder / "index.json").read_text())
    on_disk = {k.rpartition(".")[0] for k in index if k.endswith(".qweight")}
    expected = {n for n in plan if any(n == m or n.startswith(m + ".") for m in MAPS[offloaded])}
    assert on_disk == expected
    for key, info in index.items():
        layer, _, leaf = key.rpartition(".")
        if layer in plan and leaf != "bias":
            assert leaf == "weight" and info["shape"] == [0] or info["dtype"] not in FLOAT_DTYPES, (key, info)
    # and nothing of them stays in memory: accelerate loads them for each forward
    for name in expected:
        assert model.get_submodule(name).qweight.is_meta, name


def test_cpu_entries_without_staging_are_bit_identical(fp_dir, quantized, stats, tmp_path):
    # with a "disk" entry diffusers stages the tensors of "cpu" modules in a temporary folder by default (the path
    # that bypassed quantization before); offload_state_dict=False loads them straight into the model instead
    dmap = device_map(PIXART.build(0), {"transformer_blocks.0.attn2": "disk"})
    assert dmap["transformer_blocks.0.attn1"] == "cpu"
    for path_kind in ("quantize_fp", "prequantized"):
        model = load(fp_dir, quantized, stats, "w8a8", path_kind, device_map=dmap, offload_state_dict=False,
                     offload_folder=str(tmp_path / path_kind))
        with torch.no_grad():
            assert torch.equal(run(model, INPUTS), quantized["w8a8"][1]), path_kind


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_group_offload_is_bit_identical(fp_dir, quantized, stats, offload_type, to_disk, tmp_path):
    model = load(fp_dir, quantized, stats, "w4a8_group_rotate_early", "prequantized")
    kwargs = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    if to_disk:
        kwargs["offload_to_disk_path"] = str(tmp_path / "groups")
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type=offload_type, **kwargs)
    with torch.no_grad():
        first, second = run(model, INPUTS), run(model, INPUTS)
    reference = quantized["w4a8_group_rotate_early"][1]
    assert torch.equal(first, reference) and torch.equal(second, reference)
    if to_disk:  # the group files hold the layers' integer tensors (codes, scale bits, zero points)
        dtypes = set()
        for name in os.listdir(tmp_path / "groups"):
            dtypes |= {t.dtype for t in load_file(str(tmp_path / "groups" / name)).values()}
        assert {torch.uint8, torch.int8, torch.int32} <= dtypes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_with_stream_on_gpu(fp_dir, quantized, stats, offload_type):
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in INPUTS.items()}
    reference = load(fp_dir, quantized, stats, "w8a8", "prequantized").cuda()
    model = load(fp_dir, quantized, stats, "w8a8", "prequantized")
    kwargs = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                               offload_type=offload_type, use_stream=True, **kwargs)
    with torch.no_grad():
        expected = run(reference, inputs)
        assert torch.equal(run(model, inputs), expected) and torch.equal(run(model, inputs), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path_kind", ["quantize_fp", "prequantized"])
def test_offload_map_on_gpu(fp_dir, quantized, stats, path_kind, tmp_path):
    # main device cuda: "cpu" modules are offloaded too; quantized on cuda, as the model without offload is
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in INPUTS.items()}
    reference = load(fp_dir, quantized, stats, "w4a8_group_rotate_early", path_kind, device_map="cuda")
    dmap = device_map(PIXART.build(0), {"transformer_blocks.0.attn1": "disk", "transformer_blocks.0.attn2": "cpu",
                                        "proj_out": "cpu"}, rest="cuda:0")
    model = load(fp_dir, quantized, stats, "w4a8_group_rotate_early", path_kind, device_map=dmap,
                 offload_folder=str(tmp_path / "offload"))
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(reference, inputs))


@pytest.mark.parametrize("path_kind", ["quantize_fp", "prequantized"])
def test_nested_map_is_refused_with_the_fix(fp_dir, quantized, stats, path_kind, tmp_path):
    # accelerate places a module with all its submodules: a map whose root (or a block) keeps a device while a
    # submodule is offloaded fails deep inside accelerate ("... is on the meta device, we need a `value`")
    for dmap, parent, child in [({"": "cpu", "transformer_blocks": "disk"}, "the whole model ('')",
                                 "'transformer_blocks'"),
                                ({**device_map(PIXART.build(0), {"transformer_blocks.0": "cpu"}),
                                  "transformer_blocks.0.attn1.to_q": "disk"}, "'transformer_blocks.0'",
                                 "'transformer_blocks.0.attn1.to_q'")]:
        with pytest.raises(ValueError, match=rf"maps {re.escape(parent)} to 'cpu' but its submodule {child} to 'disk'.*"
                                             r"Remove the entry .* give each child of it its own entry"):
            load(fp_dir, quantized, stats, "w8a8", path_kind, device_map=dmap, offload_folder=str(tmp_path))


def test_save_and_dequantize_of_an_offloaded_model_are_refused(fp_dir, quantized, stats, tmp_path):
    dmap = device_map(PIXART.build(0), {"transformer_blocks.0": "disk"})
    model = load(fp_dir, quantized, stats, "w8a8", "prequantized", device_map=dmap,
                 offload_folder=str(tmp_path / "offload"))
    with pytest.raises(ValueError, match=r"offloaded .* save_pretrained needs them in memory. Load the model "
                                         r"without a device_map"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(ValueError, match=r"10 quantized layer\(s\) are offloaded \(e.g. 'transformer_blocks\.0\.\S+': "
                                         r"its integer weights are on the meta device.*dequantize\(\) it, then "
                                         r"offload"):
        model.dequantize()
    assert isinstance(model.transformer_blocks[0].attn1.to_q, ViDiTQLinear)  # nothing changed
    with torch.no_grad():
        assert torch.equal(run(model, INPUTS), quantized["w8a8"][1])
