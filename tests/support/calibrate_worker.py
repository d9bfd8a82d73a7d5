"""Run `calibrate` on a pipeline directory and save the statistics (main process only).

tests/integration/test_calibration.py runs it as `ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu
--num_processes 2 tests/support/calibrate_worker.py PIPE OUT.safetensors` and calls `run` itself for the
single-process reference, so both use exactly these prompts and settings.
"""

import sys

import torch

PROMPTS = ["a thick handwritten digit 7", "a thin digit 3", "an italic digit 5", "a small digit 0"]
SETTINGS = dict(num_inference_steps=2, guidance_scale=4.5, seeds=[11, 12, 13, 14], timestep_buckets=4,
                height=32, width=32, use_resolution_binning=False, clean_caption=False)


def run(pipe_dir):
    from diffusers import DiffusionPipeline

    from viditq_diffusers.calibration import calibrate

    return calibrate(DiffusionPipeline.from_pretrained(pipe_dir), PROMPTS, **SETTINGS)


if __name__ == "__main__":
    from accelerate import PartialState

    torch.set_num_threads(1)  # the test's single-process run uses 1 thread too: same math
    stats = run(sys.argv[1])
    state = PartialState()  # after calibrate, which sets it up (cpu=True under ACCELERATE_USE_CPU)
    print(f"process {state.process_index}: Num processes: {state.num_processes}", flush=True)
    if state.is_main_process:
        stats.save(sys.argv[2])
