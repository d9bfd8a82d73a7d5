"""Two or more quantization plans on the same held-out prompts and seeds, with paired confidence intervals.

A frontier table from one prompt set can order two plans that are within noise of each other: on the
stressed image pipeline the same plan measured 38.86 dB / FD 0.217 on 30 samples and 38.84 dB / FD 0.324 on
30 others. This script says how sure a comparison is. Every plan is generated on the same prompts and seeds
(the evaluation prompts of `quality.py`, seeds from `--seed-offset`) and compared with the first plan, paired
by sample: the mean per-sample PSNR difference and the FD difference, each with a 95% bootstrap interval
(the prompts resampled with replacement, the same resample for both plans).

Plans: `heuristic` (the paper's W4A8-MP preset), `w8a8` / `w4a8` (uniform presets) or a plan JSON file
(e.g. from `mixed_precision.py` or `viditq search`); all use the calibration statistics given.

    python -m benchmarks.compare_plans --calibration benchmarks/mixed_precision/image-stressed-calibration.safetensors \
        --stress 100 heuristic benchmarks/mixed_precision/blocks8/image-stressed-searched-5bits.plan.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from diffusers import DiffusionPipeline

from benchmarks.quality import ImageTask, VideoTask
from reference.classifier import load_classifier
from viditq_diffusers import ViDiTQConfig, metrics, quantize
from viditq_diffusers.calibration import CalibrationStats
from viditq_diffusers.evaluation import generate, with_transformer
from viditq_diffusers.jsonio import read_json
from viditq_diffusers.plan import average_weight_bits
from viditq_diffusers.testing.stress import stress

PRESETS = {"heuristic": dict(preset="w4a8_mp"), "w8a8": dict(preset="w8a8"), "w4a8": dict(preset="w4a8")}


def config_of(name: str) -> dict:
    if name in PRESETS:
        return PRESETS[name]
    if not os.path.isfile(name):
        raise SystemExit(f"{name!r} is neither a preset name ({', '.join(PRESETS)}) nor a plan JSON file")
    return dict(plan=read_json(name))


def sample_features(task, classifier, samples: torch.Tensor) -> torch.Tensor:
    """Classifier features grouped per sample: `[N, D]` for images, `[N, frames, D]` for videos."""
    feats = task.features(classifier, samples)
    return feats.reshape(len(samples), -1, feats.shape[-1])


def fd(feats: torch.Tensor, ref: torch.Tensor) -> float:
    return metrics.frechet_distance(feats.flatten(0, 1), ref.flatten(0, 1))


def interval(values: list[float]) -> str:
    v = torch.tensor(values).sort().values
    return f"[{float(v[int(0.025 * len(v))]):+.3f}, {float(v[int(0.975 * len(v)) - 1]):+.3f}]"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="preset names (heuristic, w8a8, w4a8) or plan JSON files; "
                                                 "the first is the baseline")
    parser.add_argument("--calibration", required=True, help="statistics the plans quantize with (safetensors)")
    parser.add_argument("--video", action="store_true", help="the video pipeline (default: image)")
    parser.add_argument("--stress", type=float, default=0.0, help="k of the stressed variant (0: unstressed)")
    parser.add_argument("--per-digit", type=int, default=10, help="image: prompts per digit")
    parser.add_argument("--per-pair", type=int, default=1, help="video: clips per (digit, direction)")
    parser.add_argument("--seed-offset", type=int, default=0, help="seeds are offset + 0, 1, ...")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = VideoTask(args) if args.video else ImageTask(args)
    configs = {name: config_of(name) for name in args.plans}
    stats = CalibrationStats.load(args.calibration)
    pipe = DiffusionPipeline.from_pretrained(task.pipeline)
    if args.stress:
        pipe = stress(pipe, k=args.stress)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    seeds = [args.seed_offset + i for i in range(len(task.prompts))]
    reference = generate(pipe, task.prompts, seeds, **task.call)
    ref_feats = sample_features(task, classifier, reference)
    results = {}
    for name, kwargs in configs.items():
        model = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(**kwargs, calibration=stats))
        samples = generate(with_transformer(pipe, model), task.prompts, seeds, **task.call)
        results[name] = {"bits": average_weight_bits(model.config.quantization_config.plan),
                         "psnr": metrics.psnr(samples, reference, reduction="none"),
                         "feats": sample_features(task, classifier, samples),
                         "accuracy": task.accuracy(classifier, samples)}
    base_name = args.plans[0]
    base = results[base_name]
    draws = torch.randint(len(seeds), (args.bootstrap, len(seeds)), generator=torch.Generator().manual_seed(0))
    print(f"{len(seeds)} samples (seeds {seeds[0]}..{seeds[-1]}); differences vs {base_name}, paired by sample, "
          f"95% bootstrap intervals over {args.bootstrap} resamples of the prompts")
    print("| plan | avg weight bits | PSNR dB | accuracy | FD | PSNR diff [95%] | FD diff [95%] |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        diff = r["psnr"] - base["psnr"]
        fd_now = fd(r["feats"], ref_feats)
        cells = "- | -"
        if name != base_name:
            fd_diffs = [fd(r["feats"][i], ref_feats[i]) - fd(base["feats"][i], ref_feats[i]) for i in draws]
            cells = (f"{float(diff.mean()):+.2f} {interval([float(diff[i].mean()) for i in draws])} | "
                     f"{fd_now - fd(base['feats'], ref_feats):+.3f} {interval(fd_diffs)}")
        print(f"| {name} | {r['bits']:.2f} | {float(r['psnr'].mean()):.2f} | {r['accuracy']:.3f} | {fd_now:.3f} | "
              f"{cells} |")


if __name__ == "__main__":
    sys.exit(main())
