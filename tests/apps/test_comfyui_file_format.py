"""The pack's file format (comfyui_nodes/file_format.py) refuses damaged or hand-edited files when read, naming the
file and what is wrong: real safetensors files with bad metadata or bad quantized tensors. Needs no ComfyUI (the
module imports only the core); the Load node's own test is in test_comfyui_nodes.py."""

import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_nodes import file_format
from viditq_diffusers.layer_spec import LayerSpec
from viditq_diffusers.nn import ViDiTQLinear
from viditq_diffusers.plan import PLAN_VERSION

LAYER = "blocks.0.fc"


def valid_file():
    """(metadata, tensors) of a one-layer W4A8 file as ViDiT-Q Save writes it."""
    linear = torch.nn.Linear(64, 32)
    spec = LayerSpec.for_linear(linear, weight_bits=4)
    layer = ViDiTQLinear.from_linear(linear, spec)
    tensors = {f"{LAYER}.{k}": t for k, t in layer.state_dict().items()}
    tensors["final.weight"] = torch.zeros(4, 32)
    meta = {"version": file_format.FORMAT_VERSION, "model_class": "PixArtAlpha", "unet_config": {"depth": 1},
            "dtype": "float32", "plan": {"version": PLAN_VERSION, "model_class": "PixArtMS",
                                         "layers": {LAYER: spec.to_json()}}}
    return meta, tensors


def write(tmp_path, meta, tensors, raw=None):
    path = tmp_path / "edited.safetensors"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path),
              metadata={file_format.METADATA_KEY: raw if raw is not None else json.dumps(meta)})
    return str(path)


def test_valid_file_reads_back(tmp_path):
    meta, tensors = valid_file()
    read_meta, read_tensors = file_format.read(write(tmp_path, meta, tensors))
    assert read_meta == meta and all(torch.equal(read_tensors[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("edit, message", [
    (lambda m: "{not json", r"edited.safetensors: its 'viditq_comfyui' metadata is not valid JSON"),
    (lambda m: json.dumps([m]), r"edited.safetensors: its 'viditq_comfyui' metadata is a JSON list, not an object"),
    (lambda m: dict(m, model_class=None), r"edited.safetensors: metadata field 'model_class' must be a str"),
    (lambda m: dict(m, unet_config="depth=1"), r"metadata field 'unet_config' must be a dict, got 'depth=1'"),
    (lambda m: dict(m, dtype="float99"), r"'dtype' must name a torch floating-point dtype .*got 'float99'"),
    (lambda m: dict(m, dtype="int8"), r"'dtype' must name a torch floating-point dtype .*got 'int8'"),
    (lambda m: {k: v for k, v in m.items() if k != "plan"}, r"edited.safetensors: its metadata has no 'plan' field"),
    (lambda m: dict(m, plan={"version": PLAN_VERSION, "layers": []}), r"the plan in its metadata is invalid"),
    (lambda m: dict(m, plan={**m["plan"], "version": 99}), r"the plan in its metadata is invalid .*version 99"),
    (lambda m: dict(m, version=2), r"edited.safetensors has ViDiT-Q file format version 2"),
])
def test_bad_metadata_names_the_file_and_the_field(tmp_path, edit, message):
    meta, tensors = valid_file()
    edited = edit(meta)
    path = write(tmp_path, None, tensors, raw=edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ValueError, match=message):
        file_format.read(path)


@pytest.mark.parametrize("key, tensor, message", [
    ("qweight", torch.zeros(32, 32, dtype=torch.int32), r"tensor blocks.0.fc.qweight is int32 \[32, 32\], but layer "
                                                        r"'blocks.0.fc' \(W4A8\) stores uint8 \[32, 32\]"),
    ("qweight", torch.zeros(32, 64, dtype=torch.uint8),
     r"tensor blocks.0.fc.qweight is uint8 \[32, 64\], .* stores uint8 \[32, 32\]"),
    ("weight_scale", torch.zeros(32, 1, dtype=torch.float32),
     r"tensor blocks.0.fc.weight_scale is float32 \[32, 1\], .* int32 \[32, 1\]"),
    ("bias", torch.zeros(32, dtype=torch.int64), r"tensor blocks.0.fc.bias is int64 \[32\], .* stores float32 \[32\]"),
    ("bias", torch.zeros(16), r"tensor blocks.0.fc.bias is float32 \[16\]"),
    ("weight_scale", None, r"quantized layer 'blocks.0.fc' \(W4A8\) has no 'weight_scale' tensor"),
])
def test_quantized_tensors_are_checked_when_read(tmp_path, key, tensor, message):
    """Before, a wrong dtype loaded (ComfyUI's loader assigns tensors as they are) and failed at the first
    sampling step, without the file's name."""
    meta, tensors = valid_file()
    if tensor is None:
        del tensors[f"{LAYER}.{key}"]
    else:
        tensors[f"{LAYER}.{key}"] = tensor
    with pytest.raises(ValueError, match=f"edited.safetensors: {message}"):
        file_format.read(write(tmp_path, meta, tensors))


def test_half_precision_bias_is_accepted(tmp_path):
    """Floating tensors may be stored in another float dtype (ComfyUI casts them): only their shape must match."""
    meta, tensors = valid_file()
    tensors[f"{LAYER}.bias"] = tensors[f"{LAYER}.bias"].half()
    file_format.read(write(tmp_path, meta, tensors))
