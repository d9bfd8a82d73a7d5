"""The shipped reference models load offline and do their job (small N: the full check is reference/evaluate.py)."""

import os

import pytest
import torch
from diffusers import DiffusionPipeline

from reference.classifier import load_classifier
from reference.data import prompt_for, sample_batch
from reference.evaluate_video import classify_clips, video_call
from reference.video_data import sample_clips, video_prompt_for
from viditq_diffusers.evaluation import generate
from viditq_diffusers.testing.stress import stress

from tests.support import REPO

ROOT = str(REPO)
PIPELINE = os.path.join(ROOT, "reference_models", "pixart_digits")
VIDEO_PIPELINE = os.path.join(ROOT, "reference_models", "latte_digits")


def test_classifier_recognises_held_out_digits():
    images, digits, _, _ = sample_batch(torch.Generator().manual_seed(123), 200, split="test")
    accuracy = (load_classifier()(images).argmax(-1) == digits).float().mean().item()
    assert accuracy > 0.95


def test_image_pipeline_loads_offline_and_draws_the_requested_digit(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = DiffusionPipeline.from_pretrained(PIPELINE)
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.transformer.config.num_layers >= 8
    pipe.set_progress_bar_config(disable=True)
    digits = [0, 3, 7, 9]
    samples = generate(pipe, [prompt_for(d, "thick") for d in digits], [0, 1, 2, 3], num_inference_steps=20,
                       guidance_scale=4.5, use_resolution_binning=False, clean_caption=False)
    assert samples.shape == (4, 3, 32, 32)
    predicted = load_classifier()(samples).argmax(-1).tolist()
    assert sum(p == d for p, d in zip(predicted, digits)) >= 3, predicted


def test_video_scoring_on_real_clips():
    """The video metric itself: held-out moving digits get their digit and direction recognised."""
    clips, digits, directions, _ = sample_clips(torch.Generator().manual_seed(5), 100, split="test")
    predicted, moves = classify_clips(load_classifier(), clips)
    assert (predicted == digits).float().mean() > 0.95
    assert moves == directions


@pytest.mark.slow
def test_video_pipeline_loads_offline_and_draws_the_requested_digit(monkeypatch):
    # The direction of motion does not follow the prompt reliably yet (see benchmarks/RESULTS.md), so only the
    # digit is asserted here; reference/evaluate_video.py measures both.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = DiffusionPipeline.from_pretrained(VIDEO_PIPELINE)
    assert type(pipe).__name__ == "LattePipeline" and len(pipe.transformer.temporal_transformer_blocks) > 0
    pipe.set_progress_bar_config(disable=True)
    requests = [(1, "left"), (4, "right"), (7, "up"), (8, "down")]
    clips = generate(pipe, [video_prompt_for(d, m) for d, m in requests], [0, 1, 2, 3], **video_call())
    assert clips.shape == (4, 8, 3, 32, 32)
    digits, _ = classify_clips(load_classifier(), clips)
    assert sum(int(d) == want for d, (want, _) in zip(digits, requests)) >= 3, digits


def test_stressed_video_pipeline_generates_the_same_clip():
    pipe = DiffusionPipeline.from_pretrained(VIDEO_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    call = dict(video_call(steps=3), prompt="a handwritten digit 2 moving up", output_type="pt")
    ref = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    out = stress(pipe, k=100.0)(**call, generator=torch.Generator().manual_seed(0)).frames
    assert (out - ref).abs().max() < 1e-4  # float32; exact in float64 (tests/integration/test_stress.py)
