"""Arguments and files from users are checked before they can give a silent wrong result: the config's names and
numbers, `calibrate`, statistics files, `search`, and the loaders' view of a checkpoint's files."""

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.calibration import CalibrationStats, calibrate
from viditq_diffusers.checkpoint import checkpoint_summary, load_any
from viditq_diffusers.cli import main as cli
from viditq_diffusers.mixed_precision.search import search
from viditq_diffusers.testing.zoo import ZOO, build_tiny_pixart_pipeline

PIXART = ZOO["PixArtTransformer2DModel"]
CALL = dict(height=32, width=32, use_resolution_binning=False, clean_caption=False)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pipe") / "pixart")


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return DiffusionPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def stats_file(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    calibrate(pipe, ["a digit 7"], num_inference_steps=2, **CALL).save(path)
    return path


@pytest.fixture(scope="module")
def q_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "pixart-w8a8"
    PIXART.cls.from_pretrained(save_fp(tmp_path_factory.mktemp("fp")), quantization_config=ViDiTQConfig()) \
        .save_pretrained(path)
    return path


def save_fp(root):
    PIXART.build(seed=0).save_pretrained(root / "pixart")
    return root / "pixart"


# -- ViDiTQConfig: numbers are never truncated, every argument names itself ---------------------------------

@pytest.mark.parametrize("kwargs, error, expected", [
    (dict(weight_bits=8.7), ValueError, r"weight_bits must be an integer, got 8\.7 \(float\).*e\.g\. weight_bits=8"),
    (dict(group_size=16.5), ValueError, r"group_size must be an integer, got 16\.5 \(float\)"),
    (dict(rotation_seed=1.9), ValueError, r"rotation_seed must be an integer, got 1\.9 \(float\)"),
    (dict(weight_bits=True), TypeError, r"weight_bits must be an integer, got True \(bool\)"),
    (dict(act_bits="8"), TypeError, r"act_bits must be an integer, got '8' \(str\)"),
    (dict(group_size=0), ValueError, r"group_size must be an integer >= 1, got 0"),
    (dict(rotation_seed=-1), ValueError, r"rotation_seed must be an integer in \[0, \d+\], got -1"),
    (dict(rotation_seed=2**70), ValueError, r"rotation_seed must be an integer in \[0, \d+\]"),
    (dict(weight_symmetric="no"), TypeError, r"weight_symmetric must be True or False, got 'no' \(str\)"),
    (dict(weight_symmetric=0), TypeError, r"weight_symmetric must be True or False, got 0 \(int\)"),
    (dict(preset="rotate_w8a8", alpha=True), TypeError, r"alpha must be a number, got True \(bool\)"),
    (dict(preset="rotate_w8a8", alpha=float("nan")), ValueError, r"alpha must be a finite number, got nan"),
    (dict(preset="rotate_w8a8", alpha="0.5"), TypeError, r"alpha must be a number, got '0\.5' \(str\)"),
    (dict(preset="rotate_w8a8", alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1\.5"),
    (dict(early_weight_bits=8, early_timestep=math.inf), ValueError, r"early_timestep must be a finite number"),
    (dict(early_weight_bits=6), ValueError, r"early_weight_bits must be one of \{4, 8\}, got 6"),
    (dict(preset=["w8a8"]), ValueError, r"Unknown preset \['w8a8'\]"),
    (dict(balance=["smooth"]), ValueError, r"balance must be one of .*, got \['smooth'\] \(list\)"),
    (dict(components=[]), ValueError, r"components is empty"),
    (dict(modules_to_not_convert=5), TypeError, r"modules_to_not_convert takes a name or a list of names"),
    (dict(modules_to_not_convert=[""]), ValueError, r"modules_to_not_convert holds an empty name"),
    (dict(calibration=3), TypeError, r"calibration must be CalibrationStats .*, got int"),
    (dict(preset="naive_w8a8", calibration={"a": float("nan")}), ValueError,
     r"calibration\['a'\] must be a finite number, got nan"),
    (dict(preset="naive_w8a8", calibration={"a": torch.tensor(1.0)}), TypeError,
     r"calibration\['a'\] must be a number, got tensor"),
    (dict(plan=[1]), TypeError, r"plan must be a plan dict or the path of a plan JSON file, got list"),
    (dict(quant_method="awq"), ValueError, r"quant_method must be 'viditq', got 'awq'"),
])
def test_config_arguments_name_themselves(kwargs, error, expected):
    with pytest.raises(error, match=expected):
        ViDiTQConfig(**kwargs)


def test_numpy_numbers_and_whole_floats_are_numbers():
    config = ViDiTQConfig(preset="rotate_w4a8", weight_bits=np.int64(4), group_size=np.int32(16), alpha=np.float32(0.5),
                          rotation_seed=3.0, weight_symmetric=np.bool_(True))
    assert (config.weight_bits, config.group_size, config.alpha, config.rotation_seed) == (4, 16, 0.5, 3)
    assert all(type(v) is int for v in (config.weight_bits, config.group_size, config.rotation_seed))
    assert config.weight_symmetric is True and json.loads(config.to_json_string())["group_size"] == 16
    assert ViDiTQConfig.from_dict(config.to_dict()) == config


def test_path_calibration_is_a_string(stats_file):
    config = ViDiTQConfig(calibration=stats_file)
    assert config.calibration == str(stats_file) and json.loads(config.to_json_string())["calibration"]


def test_modules_to_not_convert_that_match_nothing_warn(q_dir, tmp_path):
    fp = save_fp(tmp_path)
    with pytest.warns(UserWarning, match=r"modules_to_not_convert entry 'transformer_blocks\.0\.atn2' matches no "
                                         r"module of PixArtTransformer2DModel"):
        PIXART.cls.from_pretrained(fp, quantization_config=ViDiTQConfig(
            modules_to_not_convert=["transformer_blocks.0.atn2", "transformer_blocks.*.ff.*"]))
    with warnings.catch_warnings():  # names, prefixes and patterns that match stay quiet
        warnings.filterwarnings("error", message="modules_to_not_convert")
        PIXART.cls.from_pretrained(fp, quantization_config=ViDiTQConfig(
            modules_to_not_convert=["proj_out", "transformer_blocks.0.attn2", "transformer_blocks.*.ff.net.2"]))


def test_pipeline_components_that_match_nothing_are_an_error(pipe_dir):
    with pytest.raises(ValueError, match=r"components=\['transformr'\] names \['transformr'\], which is not a "
                                         r"diffusers model or a supported text encoder of the pipeline .*the ones it "
                                         r"has: text_encoder, transformer, vae"):
        load_any(str(pipe_dir), quantization_config=ViDiTQConfig(components="transformr"))
    with pytest.raises(ValueError, match=r"names \['scheduler'\]"):
        load_any(str(pipe_dir), quantization_config=ViDiTQConfig(components=["transformer", "scheduler"]))
    # diffusers' own from_pretrained too (it only logs a warning for other backends), before anything loads
    with pytest.raises(ValueError, match=r"names \['transformr'\], which is not a diffusers model or a supported "
                                         r"text encoder of this pipeline"):
        DiffusionPipeline.from_pretrained(pipe_dir, quantization_config=ViDiTQConfig(components="transformr"))


# -- a quantized checkpoint without its quantization_config, a truncated weights file ----------------------

def without_config(q_dir, tmp_path):
    path = tmp_path / "no-config"
    shutil.copytree(q_dir, path)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_quantized_weights_without_their_config_are_named(q_dir, tmp_path, capsys):
    path = without_config(q_dir, tmp_path)
    message = (r"holds ViDiT-Q quantized weights \(diffusion_pytorch_model\.safetensors: tensor "
               r"'[\w.]+\.qweight'\), but its config\.json has no 'quantization_config'.*Restore the config\.json "
               r"saved with these weights\. Do not load it with ignore_mismatched_sizes=True")
    with pytest.raises(ValueError, match=message):
        load_any(str(path))
    with pytest.raises(ValueError, match=message):
        checkpoint_summary(str(path))
    # our quantizer, handed such a folder with a fresh config, refuses too (it would re-round integer codes)
    with pytest.raises(ValueError, match=message.replace("Restore", r"quantizing it again .*Restore")):
        PIXART.cls.from_pretrained(path, quantization_config=ViDiTQConfig())
    assert cli(["info", str(path)]) == 1  # a runtime error: the command line was right, the folder is not
    assert "holds ViDiT-Q quantized weights" in capsys.readouterr().err


def test_truncated_single_file_is_named_by_our_loaders(q_dir, tmp_path):
    path = tmp_path / "truncated"
    shutil.copytree(q_dir, path)
    file = path / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors is not a valid safetensors file .*"
                                         r"truncated or corrupt\. Re-download it or save the model again"):
        load_any(str(path))


# -- calibrate ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, expected", [
    (dict(prompts=None), TypeError, r"calibrate: prompts must be a list of prompt strings, got None"),
    (dict(prompts=[1, 2]), TypeError, r"calibrate: prompts must be strings, got 1 \(int\)"),
    (dict(num_inference_steps=2.5), ValueError, r"num_inference_steps must be an integer, got 2\.5 \(float\)"),
    (dict(num_inference_steps="2"), TypeError, r"num_inference_steps must be an integer, got '2' \(str\)"),
    (dict(num_inference_steps=0), ValueError, r"num_inference_steps must be an integer >= 1, got 0"),
    (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=float("inf")), ValueError, r"guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale="4.5"), TypeError, r"guidance_scale must be a number, got '4\.5'"),
    (dict(seeds=[0.5]), ValueError, r"seeds\[0\] must be an integer, got 0\.5"),
    (dict(seeds=7), TypeError, r"seeds must be a list of integers .*got 7 \(int\)"),
    (dict(timestep_buckets=2.5), ValueError, r"timestep_buckets must be an integer"),
    (dict(sample_rows=True), TypeError, r"sample_rows must be an integer, got True"),
    (dict(layers="transformer_blocks.0.nope"), ValueError, r"\['transformer_blocks\.0\.nope'\] are not linear"),
])
def test_calibrate_arguments_name_themselves(pipe, kwargs, error, expected):
    kwargs = {"prompts": ["a digit 7"], **kwargs}
    with pytest.raises(error, match=expected):
        calibrate(pipe, **kwargs, **CALL)


def test_calibrate_one_step_is_refused_clearly(pipe):
    # diffusers' PixArt pipeline takes a one-step path that its multistep scheduler cannot serve
    with pytest.raises(ValueError, match=r"PixArtAlphaPipeline with its DPMSolverMultistepScheduler failed at "
                                         r"num_inference_steps=1 \(IndexError.*num_inference_steps >= 2"):
        calibrate(pipe, ["a digit 7"], num_inference_steps=1, **CALL)
    assert not any(m._forward_pre_hooks for m in pipe.transformer.modules())


def test_calibrate_float_steps_that_are_whole_numbers_work(pipe):
    stats = calibrate(pipe, "a digit 7", num_inference_steps=2.0, seeds=[np.int64(3)], **CALL)
    assert stats.settings["num_inference_steps"] == 2 and stats.settings["seeds"] == [3]


# -- statistics files ---------------------------------------------------------------------------------------

def rewrite(src, dst, edit_tensors=None, edit_meta=None):
    """A copy of statistics file `src` with its tensors and / or metadata edited."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        metadata = {"viditq_calibration": edit_meta(metadata["viditq_calibration"])}
    save_file(tensors, str(dst), metadata=metadata)
    return dst


LAYER = "transformer_blocks.0.attn1.to_q"


def meta_edit(change):
    def edit(raw):
        meta = json.loads(raw)
        change(meta)
        return json.dumps(meta)
    return edit


@pytest.mark.parametrize("edit_tensors, edit_meta, expected", [
    (lambda t: t.pop(f"channel_absmax/{LAYER}"), None, rf"no 'channel_absmax/{LAYER}' tensor"),
    (lambda t: t.update({f"channel_absmax/{LAYER}": torch.ones(5)}), None,
     rf"tensor 'channel_absmax/{LAYER}' must be float32 \[64\], got float32 \[5\]"),
    (lambda t: t.update({f"bucket_absmax/{LAYER}": torch.ones(4, 64, dtype=torch.float64)}), None,
     rf"tensor 'bucket_absmax/{LAYER}' must be float32 \[\*, 64\], got float64 \[4, 64\]"),
    (lambda t: t[f"channel_absmax/{LAYER}"].__setitem__(0, float("nan")), None,
     rf"tensor 'channel_absmax/{LAYER}' holds NaN or Inf"),
    (lambda t: t[f"channel_absmax/{LAYER}"].__setitem__(0, -1.0), None,
     rf"tensor 'channel_absmax/{LAYER}' holds negative maxima"),
    (lambda t: t.update({"nonsense": torch.ones(1)}), None, r"tensor 'nonsense' is not '<kind>/<layer>'"),
    (lambda t: t.update({f"sample_bucket/{LAYER}": t[f"sample_bucket/{LAYER}"] + 100}), None,
     rf"'sample_bucket/{LAYER}' must give each of the \d+ sampled rows a bucket in \[0, 4\)"),
    (lambda t: t.pop(f"sample_bucket/{LAYER}"), None, r"has one of 'sample_tokens' / 'sample_bucket' without"),
    (None, lambda raw: raw[:-3], r"metadata is not valid JSON"),
    (None, meta_edit(lambda m: m.pop("in_features")), r"metadata key 'in_features' must be a dict, got NoneType "
                                                      r"\(missing\)"),
    (None, meta_edit(lambda m: m["in_features"].update({LAYER: 32.5})),
     rf"in_features\['{LAYER}'\] must be a positive integer, got 32\.5"),
    (None, meta_edit(lambda m: m.update(model_class=None)), r"metadata key 'model_class' must be a str"),
])
def test_malformed_statistics_files_name_the_file_and_key(stats_file, tmp_path, edit_tensors, edit_meta, expected):
    bad = rewrite(stats_file, tmp_path / "bad.safetensors", edit_tensors, edit_meta)
    with pytest.raises(ValueError, match=r"'.*bad\.safetensors'.*" + expected):
        CalibrationStats.load(bad)


def test_truncated_statistics_file(stats_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(stats_file.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"'.*cut\.safetensors' is not a valid safetensors file .*truncated"):
        CalibrationStats.load(bad)


def test_saved_statistics_still_load(stats_file):
    stats = CalibrationStats.load(stats_file)
    assert stats.channel_absmax[LAYER].shape == (64,) and stats.sample_tokens[LAYER].shape[1] == 64


# -- search -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, expected", [
    (dict(budget_bits=float("nan")), ValueError, r"search: budget_bits must be a finite number"),
    (dict(budget_bits=0), ValueError, r"search: budget_bits must be in \[1e-09, 64\], got 0\.0"),
    (dict(budget_bits="6"), TypeError, r"search: budget_bits must be a number, got '6'"),
    (dict(prompts="a cat"), TypeError, r"search: prompts must be a non-empty list of prompt strings"),
    (dict(seeds=[0, 1]), ValueError, r"search: seeds must be a list of one integer per prompt \(1\)"),
    (dict(seeds=[1.5]), ValueError, r"search: seeds\[0\] must be an integer, got 1\.5"),
    (dict(candidates=0), ValueError, r"search: candidates must be an integer >= 1, got 0"),
    (dict(candidates=2.5), ValueError, r"search: candidates must be an integer, got 2\.5"),
    (dict(options={}), TypeError, r"search: options must be a non-empty"),
    (dict(options={"W8A8": {"preset": "w8a8", "plan": {}}}), ValueError, r"option 'W8A8' sets plan"),
    (dict(tolerances={"fidelity": -1}), ValueError, r"tolerances\['fidelity'\] must be >= 0"),
    (dict(per_layer="yes"), TypeError, r"search: per_layer must be True or False"),
])
def test_search_arguments_name_themselves(pipe, kwargs, error, expected):
    kwargs = {"budget_bits": 6.0, "prompts": ["a digit 7"], "seeds": [0], **kwargs}
    with pytest.raises(error, match=expected):
        search(pipe, **kwargs)
