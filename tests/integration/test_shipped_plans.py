"""The searched mixed-precision plans shipped with the reference pipelines (issue 7, `reference/ship_plans.py`)."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline

from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.evaluation import generate
from viditq_diffusers.metrics import psnr
from viditq_diffusers.plan import average_weight_bits

from tests.support import REPO

ROOT = str(REPO)


def shipped(pipeline: str, budget: int = 5) -> tuple[str, CalibrationStats]:
    folder = os.path.join(ROOT, "reference_models", pipeline, "viditq_plans")
    return (os.path.join(folder, f"w4a8_mp_searched_{budget}bits.json"),
            CalibrationStats.load(os.path.join(folder, "calibration.safetensors")))


@pytest.mark.parametrize("budget", [5, 6])
@pytest.mark.parametrize("pipeline", ["pixart_digits", "latte_digits"])
def test_shipped_plan_is_mixed_and_within_its_budget(pipeline, budget):
    plan, stats = shipped(pipeline, budget)
    assert not stats.sample_tokens  # the slim statistics: a decided plan needs only the per-channel maxima
    pipe = DiffusionPipeline.from_pretrained(os.path.join(ROOT, "reference_models", pipeline))
    decided = quantize(pipe.transformer, ViDiTQConfig(plan=plan, calibration=stats)).config.quantization_config.plan
    assert average_weight_bits(decided) <= budget
    assert {spec.weight_bits for spec in decided["layers"].values()} == {4, 8}


def test_shipped_image_plan_beats_uniform_w4a8():
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    root = os.path.join(ROOT, "reference_models", "pixart_digits")
    prompts = ["a handwritten digit 2", "a thick handwritten digit 5", "an italic handwritten digit 8"]
    call = dict(num_inference_steps=10, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
                clean_caption=False)
    pipe = DiffusionPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    reference = generate(pipe, prompts, [0, 1, 2], **call)
    plan, stats = shipped("pixart_digits")
    scores = {}
    for label, config in {"plan": ViDiTQConfig(plan=plan, calibration=stats), "w4a8": ViDiTQConfig("w4a8")}.items():
        pipe = DiffusionPipeline.from_pretrained(root, quantization_config=config)
        pipe.set_progress_bar_config(disable=True)
        scores[label] = psnr(generate(pipe, prompts, [0, 1, 2], **call), reference)
    assert scores["plan"] > scores["w4a8"] + 1.0, scores
