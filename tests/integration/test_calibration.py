"""`calibrate`: per-layer activation statistics from real pipeline runs, saved/loaded, sharded over processes."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers.calibration import KINDS, CalibrationStats, calibrate, input_absmax
from viditq_diffusers.testing.zoo import ZOO, build_tiny_pixart_pipeline

from tests.support import calibrate_worker
from tests.support.launch import launch_two_cpu_processes

CALL = dict(height=32, width=32, use_resolution_binning=False, clean_caption=False)
PROMPTS = ["a thick handwritten digit 7", "a thin digit 3"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("calib") / "pipe")


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return DiffusionPipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def stats(pipe):
    return calibrate(pipe, PROMPTS, num_inference_steps=2, seeds=[3, 4], **CALL)


def test_statistics_are_consistent(pipe, stats):
    pipe.scheduler.set_timesteps(2)
    hit = sorted({int(t) * 4 // 1000 for t in pipe.scheduler.timesteps})
    assert stats.model_class == "PixArtTransformer2DModel" and "transformer_blocks.0.attn1.to_q" in stats.layers
    for name, a in stats.channel_absmax.items():
        assert a.shape == (stats.in_features[name],) and a.dtype == torch.float32
        assert torch.equal(a, stats.bucket_absmax[name].amax(0)) and torch.equal(a, stats.cfg_absmax[name].amax(0))
        assert [b for b in range(4) if stats.bucket_absmax[name][b].any()] == hit
        low, high = stats.token_absmax_range[name]
        assert 0 < low <= high == a.max()
        # row sample: 64 rows per visited bucket, real input rows (inside the bucket's channel range)
        rows, buckets = stats.sample_tokens[name], stats.sample_bucket[name]
        assert rows.shape == (64 * len(hit), a.numel()) and buckets.tolist() == sorted(hit * 64)
        assert (rows.abs() <= stats.bucket_absmax[name][buckets]).all() and rows.any(1).all()
    # CFG halves: block 0's self-attention input depends only on the latents + timestep (same in both
    # halves), the cross-attention keys see the empty vs the real prompt
    assert torch.equal(*stats.cfg_absmax["transformer_blocks.0.attn1.to_q"])
    assert not torch.equal(*stats.cfg_absmax["transformer_blocks.0.attn2.to_k"])


def test_matches_input_absmax(pipe, stats):
    def run():
        for prompt, seed in zip(PROMPTS, [3, 4]):
            pipe(prompt=[prompt], num_inference_steps=2, guidance_scale=4.5, output_type="latent",
                 generator=[torch.Generator().manual_seed(seed)], **CALL)

    absmax = input_absmax(pipe.transformer, run)
    assert stats.layer_absmax() == {name: absmax[name] for name in stats.layers}


def test_latte_cfg_halves_are_the_batch_halves():
    # Latte folds frames (spatial blocks) and patches (temporal blocks) into the batch dim, batch-major:
    # the first half of the flattened rows must be exactly sample 0's rows
    model = ZOO["LatteTransformer3DModel"].build(0)
    inputs = ZOO["LatteTransformer3DModel"].make_inputs(0)
    inputs["timestep"] = torch.tensor([500, 500])

    def record(batch, guidance):
        sub = {k: v[batch] if torch.is_tensor(v) else v for k, v in inputs.items()}
        return calibrate(model, ["x"], guidance_scale=guidance, run=lambda prompt, generator: model(**sub))

    both = record(slice(0, 2), 4.5)
    assert any(name.startswith("temporal_transformer_blocks.") for name in both.layers)
    for half, alone in enumerate([record(slice(0, 1), 1.0), record(slice(1, 2), 1.0)]):
        for name in both.layers:
            torch.testing.assert_close(both.cfg_absmax[name][half], alone.channel_absmax[name])
    assert not alone.cfg_absmax  # no CFG, no halves


def test_save_load_round_trip(stats, tmp_path):
    stats.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStats.load(tmp_path / "stats.safetensors")
    assert os.listdir(tmp_path) == ["stats.safetensors"]  # the temp file was renamed into place
    assert (loaded.model_class, loaded.in_features, loaded.settings) == (stats.model_class, stats.in_features,
                                                                         stats.settings)
    for kind in KINDS:
        mine, theirs = getattr(stats, kind), getattr(loaded, kind)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert loaded.settings["seeds"] == [3, 4] and loaded.settings["num_inference_steps"] == 2
    assert len(loaded.settings["prompts_sha256"]) == 64


def test_stats_without_samples_quantize_a_decided_plan_alike(pipe, stats, tmp_path):
    import copy

    from viditq_diffusers import ViDiTQConfig, quantize

    full = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(preset="w4a8", calibration=stats))
    decided = full.config.quantization_config.plan  # per-layer alpha and rotation chosen from the samples
    slim = stats.without_samples()
    slim.save(tmp_path / "slim.safetensors")
    stats.save(tmp_path / "full.safetensors")
    assert os.path.getsize(tmp_path / "slim.safetensors") < os.path.getsize(tmp_path / "full.safetensors") / 2
    assert oct(os.stat(tmp_path / "slim.safetensors").st_mode & 0o044) == oct(0o044 & ~current_umask())
    slim = CalibrationStats.load(tmp_path / "slim.safetensors")
    again = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(plan=decided, calibration=slim))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="need sampled calibration tokens"):  # the search itself needs them
        quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(preset="w4a8", calibration=slim))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stats_for_another_model_are_refused(pipe, stats, tmp_path):
    stats.check_matches(pipe)
    stats.check_matches(pipe.transformer)
    with pytest.raises(ValueError, match="recorded on PixArtTransformer2DModel, this model is DiTTransformer2DModel"):
        stats.check_matches(ZOO["DiTTransformer2DModel"].build(0))
    with pytest.raises(ValueError, match="(?s)recorded with 64 input features, this model has 32.*viditq calibrate"):
        stats.check_matches(ZOO["PixArtTransformer2DModel"].build(0))  # same class, narrower
    with pytest.raises(ValueError, match="nope: not in the calibration statistics"):
        stats.check_matches(pipe, layers=["nope"])
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not ViDiT-Q calibration statistics"):
        CalibrationStats.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="viditq calibrate"):
        CalibrationStats.load(tmp_path / "missing.safetensors")


def test_errors_are_clear(pipe):
    with pytest.raises(ValueError, match="got no prompts"):
        calibrate(pipe, [])
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 0"):
        calibrate(pipe, PROMPTS, num_inference_steps=0)
    with pytest.raises(ValueError, match="got 1 seeds for 2 prompts"):
        calibrate(pipe, PROMPTS, seeds=[1])
    with pytest.raises(ValueError, match=r"sets \['output_type'\] itself"):
        calibrate(pipe, PROMPTS, output_type="pil")
    with pytest.raises(ValueError, match="not linear layers of PixArtTransformer2DModel"):
        calibrate(pipe, PROMPTS, layers=["transformer_blocks.0.nope"])
    with pytest.raises(ValueError, match="drives a diffusers pipeline"):
        calibrate(pipe.transformer, PROMPTS)

    model = ZOO["LatteTransformer3DModel"].build(0)
    inputs = ZOO["LatteTransformer3DModel"].make_inputs(0)
    inputs["timestep"] = torch.tensor([500, 500])
    spatial_only = dict(inputs, enable_temporal_attentions=False)
    with pytest.raises(ValueError, match="never ran during calibration: temporal_transformer_blocks.0.*unused at"):
        calibrate(model, ["x"], run=lambda prompt, generator: model(**spatial_only))
    broken = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    broken["hidden_states"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'transformer_blocks.0.attn1.to_q' got a NaN/Inf input at timestep 500"):
        calibrate(model, ["x"], run=lambda prompt, generator: model(**broken))
    # hooks are gone after a failure
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_two_processes_give_the_single_process_statistics(pipe_dir, tmp_path):
    worker = calibrate_worker.__file__
    out = tmp_path / "dist.safetensors"
    result = launch_two_cpu_processes(worker, pipe_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stdout
    distributed = CalibrationStats.load(out)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker: same math
    try:
        single = calibrate_worker.run(pipe_dir)
    finally:
        torch.set_num_threads(threads)
    assert distributed.settings == single.settings and distributed.in_features == single.in_features
    for kind in KINDS:  # sample rows too: the bottom-k priority sample merges exactly
        mine, theirs = getattr(single, kind), getattr(distributed, kind)
        assert mine.keys() == theirs.keys() and mine
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), (kind, name)
