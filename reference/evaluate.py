"""Score the FP image reference pipeline: does it draw the digit the prompt asks for?

Generates 20 samples per digit (200 in all; styles cycle plain/thick/thin/faint/italic; sample i uses
``torch.Generator().manual_seed(seed + i)``), classifies them with the shipped digit classifier and prints
accuracy per digit and per style. Saves a 10x20 grid (row = digit) as samples.png in the pipeline folder.

    python -m reference.evaluate                     # reference_models/pixart_digits, 20 steps, guidance 4.5
    python -m reference.evaluate --steps 20 --guidance 4.5 --per-digit 20 --seed 0 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from reference.classifier import DEFAULT_PATH as CLASSIFIER_PATH, load_classifier
from reference.data import DIGITS, STYLES, prompt_for, save_grid

PIPELINE_PATH = os.path.join(os.path.dirname(CLASSIFIER_PATH), "pixart_digits")


def eval_prompts(per_digit: int = 20) -> tuple[list[int], list[str], list[str]]:
    """(digits, styles, prompts), digit-major, styles cycling within each digit."""
    digits = [d for d in DIGITS for _ in range(per_digit)]
    styles = [STYLES[i % len(STYLES)] for _ in DIGITS for i in range(per_digit)]
    return digits, styles, [prompt_for(d, s) for d, s in zip(digits, styles)]


def accuracy_by(ok: torch.Tensor, keys: list, groups) -> dict:
    """Mean of the boolean ``ok`` over the samples whose key is each group."""
    return {g: ok[[i for i, k in enumerate(keys) if k == g]].float().mean().item() for g in groups}


def print_accuracy_table(title: str, accuracy: dict) -> None:
    """A two-row Markdown table: the groups, then their accuracy in percent."""
    print(f"| {title} | " + " | ".join(map(str, accuracy)) + " |\n|---" + "|---" * len(accuracy) + "|")
    print("| acc | " + " | ".join(f"{100 * a:.0f}%" for a in accuracy.values()) + " |")


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 4.5,
             batch: int = 50) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1]; sample i is seeded with ``seed + i`` (independent of batching)."""
    out = []
    for s in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(s, min(s + batch, len(prompts)))]
        out.append(pipe(prompts[s : s + batch], num_inference_steps=steps, guidance_scale=guidance,
                        height=32, width=32, use_resolution_binning=False, clean_caption=False,
                        output_type="pt", generator=gens).images)
    return torch.cat(out)


def main(argv=None) -> dict:
    from diffusers import DiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=PIPELINE_PATH)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--per-digit", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="PNG path (default: <pipeline>/samples.png)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    clf = load_classifier()
    digits, styles, prompts = eval_prompts(args.per_digit)
    t0 = time.time()
    images = generate(pipe, prompts, args.seed, args.steps, args.guidance)
    seconds = time.time() - t0
    with torch.no_grad():
        pred = clf(images * 2 - 1).argmax(-1)
    ok = pred == torch.tensor(digits)

    per_digit, per_style = accuracy_by(ok, digits, DIGITS), accuracy_by(ok, styles, STYLES)
    print(f"{len(prompts)} samples, {args.steps} steps, guidance {args.guidance}: {seconds:.1f} s "
          f"({1000 * seconds / len(prompts):.0f} ms/sample)")
    print_accuracy_table("digit", per_digit)
    print_accuracy_table("style", per_style)
    acc = ok.float().mean().item()
    print(f"digit accuracy: {100 * acc:.1f}% ({int(ok.sum())}/{len(ok)})  [issue requires >= 95%]")

    grid = args.grid or os.path.join(args.pipeline, "samples.png")
    save_grid(images * 2 - 1, grid, nrow=args.per_digit)
    print(f"grid: {grid}")
    result = dict(accuracy=acc, per_digit=per_digit, per_style=per_style, steps=args.steps,
                  guidance=args.guidance, n=len(prompts), seed=args.seed, seconds=seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
