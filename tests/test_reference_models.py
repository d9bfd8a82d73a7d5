"""The shipped reference models load offline and do their job (small N: the full check is reference/evaluate.py)."""

import os
import sys

import pytest
import torch
from diffusers import DiffusionPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reference.classifier import load_classifier  # noqa: E402
from reference.data import prompt_for, sample_batch  # noqa: E402
from viditq_diffusers.evaluation import generate  # noqa: E402

PIPELINE = os.path.join(ROOT, "reference_models", "pixart_digits")


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
