"""Score the FP video reference pipeline: right digit AND right direction of motion?

Generates 5 clips per (digit, direction) pair (200 in all; clip i uses ``torch.Generator().manual_seed(seed +
i)``). A clip's digit is the classifier's argmax of the mean softmax over its frames, each frame re-centred on
its intensity centroid first (the classifier was trained on centred digits); its direction is
``metrics.direction_of`` of ``metrics.estimate_motion`` (mean best integer shift between consecutive frames).
Prints accuracy per digit and per direction, and saves the clips as a GIF in the pipeline folder.

    python -m reference.evaluate_video               # reference_models/latte_digits, 20 steps, guidance 4.5
    python -m reference.evaluate_video --per-pair 5 --seed 0 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from reference.classifier import DEFAULT_PATH as CLASSIFIER_PATH, load_classifier
from reference.data import DIGITS
from reference.evaluate import accuracy_by, print_accuracy_table
from reference.video_data import DIRECTIONS, FRAMES, recentre, video_prompt_for
from viditq_diffusers.evaluation import generate, save_video_grid
from viditq_diffusers.metrics import direction_of, estimate_motion

PIPELINE_PATH = os.path.join(os.path.dirname(CLASSIFIER_PATH), "latte_digits")


def video_call(steps: int = 20, guidance: float = 4.5) -> dict:
    """The ``LattePipeline`` call arguments the reference video pipeline is evaluated with."""
    return dict(num_inference_steps=steps, guidance_scale=guidance, video_length=FRAMES, height=32, width=32,
                clean_caption=False)


def eval_video_prompts(per_pair: int = 5) -> tuple[list[int], list[str], list[str]]:
    """(digits, directions, prompts), digit-major, directions cycling within each digit."""
    digits = [d for d in DIGITS for _ in range(per_pair * len(DIRECTIONS))]
    dirs = [DIRECTIONS[i % len(DIRECTIONS)] for _ in DIGITS for i in range(per_pair * len(DIRECTIONS))]
    return digits, dirs, [video_prompt_for(d, m) for d, m in zip(digits, dirs)]


@torch.no_grad()
def classify_clips(classifier, clips: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """(digits (N,), directions) of clips ``(N, F, 3, H, W)`` in [-1, 1]."""
    n, f = clips.shape[:2]
    probs = classifier(recentre(clips.flatten(0, 1))).softmax(-1).reshape(n, f, -1)
    dx, dy = estimate_motion(clips)
    return probs.mean(1).argmax(-1), [direction_of(a, b) for a, b in zip(dx, dy)]


def main(argv=None) -> dict:
    from diffusers import DiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=PIPELINE_PATH)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--per-pair", type=int, default=5, help="clips per (digit, direction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gif", default=None, help="GIF path (default: <pipeline>/samples.gif)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    digits, dirs, prompts = eval_video_prompts(args.per_pair)
    t0 = time.time()
    clips = generate(pipe, prompts, [args.seed + i for i in range(len(prompts))],
                     **video_call(args.steps, args.guidance))
    seconds = time.time() - t0
    pred_digits, pred_dirs = classify_clips(load_classifier(), clips)
    digit_ok = pred_digits == torch.tensor(digits)
    dir_ok = torch.tensor([a == b for a, b in zip(pred_dirs, dirs)])
    ok = digit_ok & dir_ok

    per_digit, per_dir = accuracy_by(ok, digits, DIGITS), accuracy_by(ok, dirs, DIRECTIONS)
    print(f"{len(prompts)} clips x {FRAMES} frames, {args.steps} steps, guidance {args.guidance}: {seconds:.1f} s "
          f"({1000 * seconds / len(prompts):.0f} ms/clip)")
    print_accuracy_table("digit", per_digit)
    print_accuracy_table("direction", per_dir)
    acc = ok.float().mean().item()
    print(f"digit accuracy {100 * digit_ok.float().mean():.1f}%, direction accuracy {100 * dir_ok.float().mean():.1f}%")
    print(f"digit AND direction: {100 * acc:.1f}% ({int(ok.sum())}/{len(ok)})  [issue requires >= 90%]")

    gif = args.gif or os.path.join(args.pipeline, "samples.gif")
    stride = args.per_pair * len(DIRECTIONS)
    save_video_grid({f"digit {d}": clips[d * stride : d * stride + len(DIRECTIONS)] for d in DIGITS}, gif)
    print(f"gif: {gif}")
    result = dict(accuracy=acc, digit_accuracy=digit_ok.float().mean().item(),
                  direction_accuracy=dir_ok.float().mean().item(), per_digit=per_digit, per_direction=per_dir,
                  steps=args.steps, guidance=args.guidance, n=len(prompts), seed=args.seed, seconds=seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
