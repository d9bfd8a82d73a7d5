"""Plans are checked field by field, plan files name themselves in every error, and a checkpoint refuses a plan
(config.json) that does not fit its stored tensors or the plan its weights were saved with, naming the layer."""

import json
import shutil

import pytest
import torch

from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.calibration import input_absmax
from viditq_diffusers.plan import plan_from_json, read_plan
from viditq_diffusers.testing.zoo import ZOO, run

PIXART = ZOO["PixArtTransformer2DModel"]
LAYER = "transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "pixart"
    PIXART.build(seed=0).save_pretrained(path)
    return path


def naive_config(fp_dir):
    model = PIXART.cls.from_pretrained(fp_dir)
    inputs = PIXART.make_inputs(0)
    with torch.no_grad():
        absmax = input_absmax(model, lambda: run(model, inputs))
    return ViDiTQConfig(preset="naive_w8a8", calibration=absmax)


@pytest.fixture(scope="module")
def checkpoints(fp_dir, tmp_path_factory):
    """Saved checkpoints that between them store every kind of per-layer tensor and plan-only field, with the
    output each gave before saving."""
    configs = {"w8a8": ViDiTQConfig(), "rotate": ViDiTQConfig(preset="rotate_w8a8"),
               "early": ViDiTQConfig(preset="w4a8", early_weight_bits=8), "naive": naive_config(fp_dir)}
    root, outputs = tmp_path_factory.mktemp("q"), {}
    for name, config in configs.items():
        model = PIXART.cls.from_pretrained(fp_dir, quantization_config=config)
        with torch.no_grad():
            outputs[name] = run(model, PIXART.make_inputs(1))
        model.save_pretrained(root / name)
    return root, outputs


def edited_copy(src, tmp_path, edit):
    """A copy of checkpoint `src` whose config.json plan entry for LAYER went through `edit(entry)`."""
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"]["plan"]["layers"][LAYER])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# -- a hand-edited config.json plan is refused at load, naming the layer ------------------------------------

TENSOR_EDITS = {  # checkpoint, edit of LAYER's entry, what the message says
    "bits": ("w8a8", {"weight_bits": 4}, r"to_q\.qweight: the plan \(W4A8\) needs U8 \[32, 16\], the checkpoint "
                                         r"has I8 \[32, 32\]"),
    "group size": ("w8a8", {"group_size": 16}, r"to_q\.weight_scale: the plan \(W8A8-g16\) needs I32 \[32, 2\], "
                                               r"the checkpoint has I32 \[32, 1\]"),
    "symmetric": ("w8a8", {"symmetric": True}, r"to_q: the checkpoint has a 'weight_zero' tensor that the plan"),
    "asymmetric": ("rotate", {"symmetric": False}, None),  # rotate_w8a8 is asymmetric too: a no-op edit loads
    "smoothing": ("w8a8", {"smooth_alpha": 0.5}, r"to_q: the plan .*smoothed=True\) needs a 'act_smooth' tensor"),
    "per tensor": ("w8a8", {"weight_per_tensor": True}, r"to_q\.weight_scale: the plan .* needs I32 \[1, 1\]"),
    "early copy": ("w8a8", {"early_weight_bits": 4, "early_timestep": 500.0},
                   r"needs a 'early_qweight' tensor"),
    "no early copy": ("early", {"early_weight_bits": None, "early_timestep": None},
                      r"has a 'early_qweight' tensor that the plan"),
    # fields no tensor shows: caught by the plan recorded in the weights' metadata
    "rotation seed": ("rotate", {"rotation_seed": 7}, r"to_q: rotation_seed=7 \(saved with 0\)"),
    "no rotation": ("rotate", {"rotation_seed": None}, r"to_q: rotation_seed=None \(saved with 0\)"),
    "act scale": ("naive", {"act_scale": 1.0}, r"to_q: act_scale=1\.0 \(saved with [0-9.e-]+\)"),
    "early timestep": ("early", {"early_timestep": 100.0}, r"to_q: early_timestep=100\.0 \(saved with 750\.0\)"),
}


@pytest.mark.parametrize("case", TENSOR_EDITS)
def test_edited_plan_is_refused_naming_the_layer(checkpoints, tmp_path, case):
    name, edit, expected = TENSOR_EDITS[case]
    path = edited_copy(checkpoints[0] / name, tmp_path, lambda entry: entry.update(edit))
    if expected is None:
        PIXART.cls.from_pretrained(path)
        return
    with pytest.raises(ValueError, match=r"(?s)plan in config\.json does not match the weights saved with it "
                                         r"\(\d problem\(s\)\):.*" + expected + r".*restore the config\.json saved"):
        PIXART.cls.from_pretrained(path)


def test_unedited_checkpoints_load_identically(checkpoints):
    root, outputs = checkpoints
    for name, before in outputs.items():
        with torch.no_grad():
            assert torch.equal(run(PIXART.cls.from_pretrained(root / name), PIXART.make_inputs(1)), before), name


def test_checkpoint_records_its_plan_in_the_weights_metadata(checkpoints):
    from safetensors import safe_open

    with safe_open(str(checkpoints[0] / "rotate" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["viditq_plan"])
    plan = json.loads((checkpoints[0] / "rotate" / "config.json").read_text())["quantization_config"]["plan"]
    assert plan_from_json({"version": 1, "layers": recorded})["layers"] == plan_from_json(plan)["layers"]


# -- plan fields are type-checked ---------------------------------------------------------------------------

FIELD_EDITS = {
    "symmetric": ("no", TypeError, r"symmetric must be True or False, got 'no' \(str\)"),
    "bias": (1, TypeError, r"bias must be True or False, got 1 \(int\)"),
    "weight_bits": (8.7, ValueError, r"weight_bits must be an integer, got 8\.7 \(float\)"),
    "act_bits": (2, ValueError, r"act_bits must be one of \{4, 8, 16\}, got 2"),
    "group_size": (16.5, ValueError, r"group_size must be an integer, got 16\.5"),
    "in_features": ("32", TypeError, r"in_features must be an integer, got '32' \(str\)"),
    "smooth_alpha": (1.5, ValueError, r"smooth_alpha must be in \[0, 1\], got 1\.5"),
    "rotation_seed": (-1, ValueError, r"rotation_seed must be an integer in \[0, \d+\], got -1"),
    "act_scale": (float("nan"), ValueError, r"act_scale must be a finite number, got nan"),
    "early_weight_bits": (True, TypeError, r"early_weight_bits must be an integer, got True \(bool\)"),
    "method": ("gptq", ValueError, r"unknown method 'gptq'"),
    "colour": ("red", ValueError, r"unknown keys \['colour'\]"),
}


def w8a8_plan(fp_dir):
    return PIXART.cls.from_pretrained(fp_dir, quantization_config=ViDiTQConfig()).config.quantization_config.plan


@pytest.mark.parametrize("key", FIELD_EDITS)
def test_plan_field_types_are_checked(fp_dir, key):
    value, error, expected = FIELD_EDITS[key]
    plan = json.loads(json.dumps(w8a8_plan(fp_dir), default=lambda spec: spec.to_json()))
    plan["layers"][LAYER][key] = value
    if key == "early_weight_bits":
        plan["layers"][LAYER]["early_timestep"] = 500.0
    with pytest.raises(error, match=rf"plan entry '{LAYER}': {expected}"):
        ViDiTQConfig(plan=plan)


@pytest.mark.parametrize("change, expected", [
    (lambda p: p.update(colour="red"), r"plan has unknown keys \['colour'\]"),
    (lambda p: p.update(dtype="__class__"), r"plan 'dtype' must be one of \('float32'"),
    (lambda p: p.update(version=True), r"plan version True is not supported"),
    (lambda p: p.update(model_class=3), r"plan 'model_class' must be a class name \(a string\), got 3"),
    (lambda p: p["layers"].update({LAYER: [1, 2]}), rf"plan entry '{LAYER}' must be a JSON object"),
])
def test_plan_top_level_is_checked(fp_dir, change, expected):
    plan = json.loads(json.dumps(w8a8_plan(fp_dir), default=lambda spec: spec.to_json()))
    change(plan)
    with pytest.raises((TypeError, ValueError), match=expected):
        ViDiTQConfig(plan=plan)


def test_empty_plan_is_refused_naming_the_model(fp_dir):
    with pytest.raises(ValueError, match=r"plan for PixArtTransformer2DModel has no layers"):
        PIXART.cls.from_pretrained(fp_dir, quantization_config=ViDiTQConfig(plan={"version": 1, "layers": {}}))


# -- plan files: every error names the file -----------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ("", r" is not valid JSON .*empty, truncated or not a plan"),
    ('{"version": 1, "layers": {', r" is not valid JSON"),
    ("[1, 2]", r": plan must be a JSON object with a .layers. mapping .*, got \[1, 2\] \(list\)"),
    ("{}", r": plan must be a JSON object with a .layers. mapping .*, got keys \[\]"),
    ('{"version": 2, "layers": {}}', r": plan version 2 is not supported"),
    (b"\xff\xfe\x00", r" is not valid JSON"),
])
def test_bad_plan_file_names_the_file(tmp_path, content, expected):
    path = tmp_path / "plan.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"plan file '.*plan\.json'{expected}"):
        ViDiTQConfig(plan=str(path))
    with pytest.raises(ValueError, match=r"plan\.json"):
        read_plan(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no plan file at '.*nowhere\.json'"):
        ViDiTQConfig(plan=tmp_path / "nowhere.json")
