"""Timestep-wise precision: a layer stores a second weight copy and uses it while the model's timestep is
>= early_timestep; checked by hooks along a real pipeline run, against uniform models, and through save/reload."""

import copy

import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.plan import average_weight_bits
from viditq_diffusers.testing.zoo import ZOO, build_tiny_pixart_pipeline, run

EARLY = dict(early_weight_bits=8, early_timestep=500)


def tiny(seed=0):
    entry = ZOO["PixArtTransformer2DModel"]
    return entry.build(seed), entry.make_inputs(0)


def at(inputs, t):
    return {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}


def test_early_steps_use_the_w8_copy_late_steps_the_w4_one():
    model, inputs = tiny()
    mixed = quantize(copy.deepcopy(model), ViDiTQConfig(preset="w4a8", **EARLY))
    w8 = quantize(copy.deepcopy(model), ViDiTQConfig(preset="w8a8"))
    w4 = quantize(copy.deepcopy(model), ViDiTQConfig(preset="w4a8"))
    with torch.no_grad():
        assert torch.equal(run(mixed, at(inputs, 900)), run(w8, at(inputs, 900)))
        assert torch.equal(run(mixed, at(inputs, 500)), run(w8, at(inputs, 500)))  # >= switches
        assert torch.equal(run(mixed, at(inputs, 499)), run(w4, at(inputs, 499)))
    plan = mixed.config.quantization_config.plan
    assert average_weight_bits(plan) == 12  # both copies are stored and counted
    layer = next(m for m in mixed.modules() if isinstance(m, ViDiTQLinear))
    assert layer.weight_bytes() > next(m for m in w8.modules() if isinstance(m, ViDiTQLinear)).weight_bytes()


def test_a_pipeline_switches_at_the_right_steps(tmp_path):
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pixart_pipeline(tmp_path / "pipe"),
                                             quantization_config=ViDiTQConfig(preset="w4a8", **EARLY))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    layer = next(m for m in pipe.transformer.modules() if isinstance(m, ViDiTQLinear))
    handle = layer.register_forward_hook(lambda m, args, out: seen.append((m.clock.timestep, m.active_weight()[1])))
    pipe("a digit 3", num_inference_steps=6, height=32, width=32, use_resolution_binning=False,
         clean_caption=False, generator=torch.Generator().manual_seed(0))
    handle.remove()
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert [t for t, _ in seen] == timesteps  # one call per step (CFG batched)
    assert [bits for _, bits in seen] == [8 if t >= 500 else 4 for t in timesteps]
    assert {8, 4} == {bits for _, bits in seen}


def test_reload_and_deepcopy_keep_their_own_clock(tmp_path):
    model, inputs = tiny()
    quantize(model, ViDiTQConfig(preset="w4a8", **EARLY))
    with torch.no_grad():
        early, late = run(model, at(inputs, 800)), run(model, at(inputs, 100))
    model.save_pretrained(tmp_path / "q")
    reloaded = type(model).from_pretrained(tmp_path / "q")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for other in (reloaded, twin):
            assert torch.equal(run(other, at(inputs, 800)), early) and torch.equal(run(other, at(inputs, 100)), late)
    twin_layer = next(m for m in twin.modules() if isinstance(m, ViDiTQLinear))
    assert twin_layer.clock is not next(m for m in model.modules() if isinstance(m, ViDiTQLinear)).clock


def test_bad_early_bits_are_refused():
    with pytest.raises(ValueError, match="early_weight_bits"):
        ViDiTQConfig(preset="w4a8", early_weight_bits=6)
