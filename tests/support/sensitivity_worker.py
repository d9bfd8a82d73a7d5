"""Run `measure` on a pipeline directory; the main process writes the table as JSON.

tests/integration/test_sensitivity.py runs it as `ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu
--num_processes 2 tests/support/sensitivity_worker.py PIPE OUT.json` and calls `run` itself for the single-process
reference, so both use exactly these prompts, groups and settings."""

import json
import sys

import torch

PROMPTS, SEEDS = ["a thick digit 7", "a thin digit 1"], [0, 1]
CALL = dict(num_inference_steps=2, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
            clean_caption=False)
OPTIONS = {"W4A8": {"preset": "w4a8"}, "W8A8": {"preset": "w8a8"}}


def score(samples, reference):
    from viditq_diffusers import metrics

    return {"fidelity": metrics.psnr(samples, reference)}


def run(pipe_dir, cache=None):
    from diffusers import DiffusionPipeline

    from viditq_diffusers.mixed_precision.search import quantizable_groups
    from viditq_diffusers.mixed_precision.sensitivity import measure

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    groups = quantizable_groups(pipe.transformer, 1)
    return measure(pipe, groups, OPTIONS, PROMPTS, SEEDS, score, cache=cache, **CALL)


if __name__ == "__main__":
    from accelerate import PartialState

    torch.set_num_threads(1)  # the test's single-process run uses 1 thread too: same math
    table = run(sys.argv[1], sys.argv[2] + ".cache")
    if PartialState().is_main_process:
        with open(sys.argv[2], "w") as f:
            json.dump(table, f)
