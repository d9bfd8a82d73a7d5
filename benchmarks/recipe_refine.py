"""End-to-end recipe refinement (issue 11) on the image reference pipeline: writes the refined plan and the
fixed-recipe plans it is compared with, from one calibration run (quality.py's calibration prompts and seeds).

    python -m benchmarks.recipe_refine --bits w4a8 [--stress 100] [--objective eps] --out benchmarks/recipe_refine

Then compare them on held-out prompts and seeds (paired bootstrap intervals), e.g.:

    python -m benchmarks.compare_plans --calibration OUT/w4a8-image-calibration.safetensors --per-digit 10 \
        --seed-offset 500 OUT/w4a8-image-smooth-0.75.plan.json ... OUT/w4a8-image-refined-eps.plan.json
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from diffusers import DiffusionPipeline

from benchmarks.quality import ALPHAS, ImageTask, calibrate_task, calibration_seeds
from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.jsonio import write_json
from viditq_diffusers.plan import summarize_recipes
from viditq_diffusers.recipe_refine import refine_recipes
from viditq_diffusers.testing.stress import stress


def fixed_recipes(bits: str) -> dict[str, dict]:
    """The fixed recipes of the ablation (quality.py --suite ablation), as ViDiTQConfig kwargs."""
    return {"plain": dict(preset=bits), "rotation": dict(preset=f"rotate_{bits}"),
            **{f"smooth-{a:g}": dict(preset=f"smooth_{bits}", alpha=a) for a in ALPHAS},
            **{f"paper-{a:g}": dict(preset=f"paper_{bits}", alpha=a) for a in ALPHAS},
            "paper-auto": dict(preset=f"paper_{bits}"), "layer-search": dict(preset=bits, balance="search")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", choices=["w4a8", "w8a8"], default="w4a8")
    parser.add_argument("--stress", type=float, default=0.0, help="k of the stressed variant (0: unstressed)")
    parser.add_argument("--objective", choices=["eps", "samples"], default="eps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipe_refine"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    args.per_digit = 1
    task = ImageTask(args)
    pipe = DiffusionPipeline.from_pretrained(task.pipeline)
    if args.stress:
        pipe = stress(pipe, k=args.stress)
    pipe.set_progress_bar_config(disable=True)
    tag = f"{args.bits}-image" + (f"-stressed{args.stress:g}" if args.stress else "")
    stats_path = os.path.join(args.out, f"{tag}-calibration.safetensors")
    if os.path.exists(stats_path):
        stats = CalibrationStats.load(stats_path)
    else:
        stats = calibrate_task(pipe, task)
        stats.save(stats_path)
    for name, kwargs in fixed_recipes(args.bits).items():
        uses_stats = name not in ("plain", "rotation")  # plain: per-token only; rotation needs no statistics
        config = ViDiTQConfig(**kwargs, calibration=stats if uses_stats else None)
        model = quantize(copy.deepcopy(pipe.transformer), config)
        write_json(os.path.join(args.out, f"{tag}-{name}.plan.json"), model.config.quantization_config.plan)
    t0 = time.time()
    # The refinement measures its objective on the calibration prompts and seeds, never on the evaluation's.
    seeds = calibration_seeds(task)
    plan, trace = refine_recipes(pipe, ViDiTQConfig(preset=args.bits, calibration=stats), task.calibration_prompts,
                                 seeds, objective=args.objective, **task.call)
    path = os.path.join(args.out, f"{tag}-refined-{args.objective}.plan.json")
    write_json(path, plan)
    mix = ", ".join(f"{k} {v}" for k, v in sorted(summarize_recipes(plan).items()))
    print(f"{tag}: objective {args.objective} on the {len(seeds)} calibration prompts {trace[0]:.4g} (load-time "
          f"per-layer search) -> {trace[-1]:.4g} after refinement ({trace[-1] / trace[0]:.3f}x), "
          f"{time.time() - t0:.0f} s; layers chose: {mix}; plan saved to {path}")


if __name__ == "__main__":
    main()
