"""Quality of each quantization config on a reference pipeline, vs FP from identical noise.

For the pipeline and (with --stress) its outlier-stressed copy (synthetic, function-preserving),
it generates N prompts x seeds with FP and with each config and prints one table per pipeline:
PSNR / SSIM vs FP, teacher-forced epsilon relative MSE, classifier accuracy on the requested
digit, and FD of classifier features vs FP. It writes the tables to JSON and an image grid
(FP and each config, same seeds) per pipeline.

    python benchmarks/quality.py [--pipeline reference_models/pixart_digits] [--per-digit 2] [--stress 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
from diffusers import DiffusionPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the `reference` package (data, classifier) lives at the repo root

from reference.classifier import load_classifier  # noqa: E402
from reference.data import STYLES, prompt_for  # noqa: E402
from viditq_diffusers import ViDiTQConfig, quantize  # noqa: E402
from viditq_diffusers import metrics  # noqa: E402
from viditq_diffusers.calibration import input_absmax  # noqa: E402
from viditq_diffusers.evaluation import compare_samples, epsilon_error, generate, save_grid  # noqa: E402
from viditq_diffusers.stress import stress  # noqa: E402

CONFIGS = {
    "naive W8A8": dict(preset="naive_w8a8"),
    "ViDiT-Q W8A8": dict(preset="w8a8"),
    "W4A8": dict(preset="w4a8"),
    "W4A8 g64": dict(preset="w4a8", group_size=64),
}


def prompts_and_digits(per_digit: int, offset: int = 0):
    digits = [d for d in range(10) for _ in range(per_digit)]
    prompts = [prompt_for(d, STYLES[(i + offset) % len(STYLES)]) for i, d in enumerate(digits)]
    return prompts, digits


def with_transformer(pipe, transformer):
    new = type(pipe)(**{**pipe.components, "transformer": transformer})
    new.set_progress_bar_config(disable=True)
    return new


def evaluate(pipe, name, args, classifier, out_dir):
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=32, width=32,
                use_resolution_binning=False, clean_caption=False)
    prompts, digits = prompts_and_digits(args.per_digit)
    seeds = list(range(len(prompts)))
    labels = torch.tensor(digits)
    # Calibration for the static baseline: other prompts and seeds than the evaluation's.
    cal_prompts, _ = prompts_and_digits(1, offset=1)
    absmax = input_absmax(pipe.transformer, lambda: generate(pipe, cal_prompts, list(range(1000, 1010)), **call))

    reference = generate(pipe, prompts, seeds, **call)
    ref_feats = classifier.features(reference)
    rows = {"FP": {"psnr": float("inf"), "ssim": 1.0, "eps_rel_mse": 0.0,
                   "accuracy": metrics.accuracy(classifier(reference), labels), "fd": 0.0}}
    grid = {"FP": reference[: args.grid]}
    for label, kwargs in CONFIGS.items():
        config = ViDiTQConfig(**kwargs, calibration=absmax if kwargs["preset"] == "naive_w8a8" else None)
        quantized = with_transformer(pipe, quantize(copy.deepcopy(pipe.transformer), config))
        samples = generate(quantized, prompts, seeds, **call)
        rows[label] = {
            **compare_samples(samples, reference),
            "eps_rel_mse": epsilon_error(pipe, quantized.transformer, prompts[:10], seeds[:10], **call),
            "accuracy": metrics.accuracy(classifier(samples), labels),
            "fd": metrics.frechet_distance(classifier.features(samples), ref_feats),
        }
        grid[label] = samples[: args.grid]
    save_grid(grid, os.path.join(out_dir, f"{name}.png"))
    return rows


def print_table(name, rows):
    print(f"\n{name}\n| config | PSNR dB | SSIM | eps rel. MSE | digit accuracy | FD (classifier features) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['eps_rel_mse']:.2e} | {r['accuracy']:.3f} | {r['fd']:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=os.path.join(ROOT, "reference_models", "pixart_digits"))
    parser.add_argument("--per-digit", type=int, default=2, help="prompts per digit (x10 samples)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--stress", type=float, default=100.0, help="k of the stressed variant; 0 = skip it")
    parser.add_argument("--grid", type=int, default=10, help="samples per row in the grid")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "quality"))
    args = parser.parse_args()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    classifier = load_classifier()
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    variants = {"image": pipe}
    if args.stress:
        variants[f"image, stressed k={args.stress:g} (synthetic)"] = stressed = stress(pipe, seed=0, k=args.stress)
        stressed.set_progress_bar_config(disable=True)
    results = {}
    for name, variant in variants.items():
        slug = name.split(",")[0] + ("-stressed" if "stressed" in name else "")
        results[name] = evaluate(variant, slug, args, classifier, args.out)
        print_table(name, results[name])
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
