"""The quality harness on the tiny pipeline: identical noise, teacher-forced epsilon error, grid."""

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.evaluation import compare_samples, epsilon_error, generate, save_grid, save_video_grid
from viditq_diffusers.testing.zoo import build_tiny_pixart_pipeline

CALL = dict(num_inference_steps=3, height=32, width=32, use_resolution_binning=False, clean_caption=False)
PROMPTS, SEEDS = ["a thick digit 7", "a thin digit 1"], [0, 1]


def test_harness(tmp_path):
    path = build_tiny_pixart_pipeline(tmp_path / "pipe")
    fp = DiffusionPipeline.from_pretrained(path)
    w8 = DiffusionPipeline.from_pretrained(path, quantization_config=ViDiTQConfig(preset="w8a8"))
    w4 = DiffusionPipeline.from_pretrained(path, quantization_config=ViDiTQConfig(preset="w4a8"))
    reference = generate(fp, PROMPTS, SEEDS, **CALL)
    assert reference.shape == (2, 3, 32, 32) and reference.min() >= -1 and reference.max() <= 1
    assert torch.equal(generate(fp, PROMPTS, SEEDS, **CALL), reference), "same seeds, same samples"
    assert not torch.equal(generate(fp, PROMPTS, [5, 6], **CALL), reference)

    scores = {name: compare_samples(generate(p, PROMPTS, SEEDS, **CALL), reference)
              for name, p in (("w8", w8), ("w4", w4))}
    assert scores["w8"]["psnr"] > scores["w4"]["psnr"] > 10
    errors = {name: epsilon_error(fp, p.transformer, PROMPTS, SEEDS, **CALL) for name, p in (("w8", w8), ("w4", w4))}
    assert 0 < errors["w8"] < errors["w4"] < 1
    same = DiffusionPipeline.from_pretrained(path).transformer  # a second FP copy: zero error
    assert epsilon_error(fp, same, PROMPTS, SEEDS, **CALL) == 0

    save_grid({"FP": reference, "W8A8": generate(w8, PROMPTS, SEEDS, **CALL)}, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[1] == 2 * (64 + 2)


def test_video_grid_is_an_animated_gif(tmp_path):
    clips = torch.rand(3, 5, 3, 8, 8) * 2 - 1
    save_video_grid({"FP": clips, "W8A8": clips.flip(1)}, tmp_path / "grid.gif", scale=1)
    gif = Image.open(tmp_path / "grid.gif")
    assert gif.n_frames == 5 and gif.size[1] == 2 * (8 + 2)
    first = torch.tensor(list(gif.convert("L").getdata())).reshape(gif.size[1], gif.size[0])
    gif.seek(4)
    last = torch.tensor(list(gif.convert("L").getdata())).reshape(gif.size[1], gif.size[0])
    assert not torch.equal(first, last)  # the frames differ: it animates
