"""Quality of each quantization config on the reference pipelines, vs FP from identical noise.

For the image pipeline (PixArt-alpha) and the video pipeline (Latte), and with --stress their outlier-stressed
copies (synthetic, function-preserving), it generates prompts x seeds with FP and with each config and prints
one table per pipeline: PSNR / SSIM vs FP, teacher-forced epsilon relative MSE, classifier accuracy on the
request (image: the digit; video: the digit AND the direction of motion), FD of classifier features vs FP and,
for video, the frame-to-frame warp error relative to FP's. It writes the tables to JSON, an image grid per
image pipeline and an animated GIF grid per video pipeline (FP and each config, same seeds).

    python -m benchmarks.quality [--per-digit 5] [--per-pair 1] [--stress 100] [--only image|video]
    python -m benchmarks.quality --suite ablation     # channel-balancing ablation (W4A8 and W8A8 baselines)
    python -m benchmarks.quality --suite text_encoder --stress 0  # the T5 text encoder quantized too

In the text_encoder suite a row's `text_encoder` entry quantizes the pipeline's T5 encoder as a user does,
`T5EncoderModel.from_pretrained(<pipeline>/text_encoder, quantization_config=ViDiTQConfig(...))`; its table
adds the cosine and relative squared error of the evaluation prompts' embeddings vs the FP encoder. The eps rel.
MSE column is the transformer's alone (teacher-forced on the FP trajectory, FP embeddings).

All configs that need activation statistics share one calibration run (`viditq_diffusers.calibrate`) on
other prompts and seeds than the evaluation's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from diffusers import DiffusionPipeline

from benchmarks.text_encoder_quality import embedding_metrics
from reference.classifier import load_classifier
from reference.data import STYLES, prompt_for
from reference.evaluate_video import classify_clips, eval_video_prompts, video_call
from reference.video_data import DIRECTIONS, recentre, video_prompt_for
from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers import metrics
from viditq_diffusers.calibration import calibrate
from viditq_diffusers.footprint import fp16_weight_bytes, weight_bytes
from viditq_diffusers.plan import average_weight_bits, summarize_recipes
from viditq_diffusers.evaluation import compare_samples, epsilon_error, generate, save_grid, save_video_grid
from viditq_diffusers.testing.stress import stress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# "stats": the config takes the calibration statistics. "text_encoder": ViDiTQConfig kwargs of the T5 encoder
# (quantized too); a row with no other key keeps the transformer in floating point.
# The shipped encoders are 64 wide (q/k/v/o and wi inputs; wo stays FP): group 32 gives two groups per row.
ENCODER_W4A16 = dict(preset="w4a16", group_size=32)
ALPHAS = (0.5, 0.75, 0.9)  # global smoothing alphas (ViDiT-Q convention) of the ablation
SUITES = {
    "presets": {
        "naive W8A8": dict(preset="naive_w8a8", stats=True),
        "ViDiT-Q W8A8 (per-token, no calibration)": dict(preset="w8a8"),
        "ViDiT-Q W8A8 (calibrated: per-layer balancing)": dict(preset="w8a8", stats=True),
        "W4A8": dict(preset="w4a8"),
        "W4A8 g64": dict(preset="w4a8", group_size=64),
        "ViDiT-Q W4A8 (calibrated: per-layer balancing)": dict(preset="w4a8", stats=True),
    },
    # Channel balancing (issues 5 and 11): each recipe on every layer, at global alphas and with the per-layer
    # automatic alpha, against the per-layer recipe search (the default with calibration).
    "ablation": {
        "W8A8 naive (static per-tensor)": dict(preset="naive_w8a8", stats=True),
        "W8A8 SmoothQuant (static, alpha 0.5)": dict(preset="smoothquant_w8a8", stats=True),
        "W8A8 plain (per-token)": dict(preset="w8a8"),
        "W8A8 rotation only": dict(preset="rotate_w8a8"),
        **{f"W8A8 smoothing only, alpha {a:g}": dict(preset="smooth_w8a8", stats=True, alpha=a) for a in ALPHAS},
        **{f"W8A8 paper (smooth+rotate), alpha {a:g}": dict(preset="paper_w8a8", stats=True, alpha=a) for a in ALPHAS},
        "W8A8 paper (smooth+rotate), auto alpha": dict(preset="paper_w8a8", stats=True),
        "W8A8 per-layer recipe search": dict(preset="w8a8", stats=True),
        "W4A8 plain (per-channel)": dict(preset="w4a8"),
        "W4A8 rotation only": dict(preset="rotate_w4a8"),
        **{f"W4A8 smoothing only, alpha {a:g}": dict(preset="smooth_w4a8", stats=True, alpha=a) for a in ALPHAS},
        **{f"W4A8 paper (smooth+rotate), alpha {a:g}": dict(preset="paper_w4a8", stats=True, alpha=a) for a in ALPHAS},
        "W4A8 paper (smooth+rotate), auto alpha": dict(preset="paper_w4a8", stats=True),
        "W4A8 per-layer recipe search": dict(preset="w4a8", stats=True),
    },
    # Issue 28: the whole pipeline quantized. Transformer W8A8 / W4A8-MP as the presets suite and
    # benchmarks.mixed_precision build them (calibrated), alone and with the encoder W8A16 or W4A16 g32.
    "text_encoder": {
        "encoder W8A16, transformer FP": dict(text_encoder=dict(preset="w8a16")),
        "encoder W4A16 g32, transformer FP": dict(text_encoder=ENCODER_W4A16),
        "W8A8 (calibrated), encoder FP": dict(preset="w8a8", stats=True),
        "W8A8 (calibrated) + encoder W8A16": dict(preset="w8a8", stats=True, text_encoder=dict(preset="w8a16")),
        "W8A8 (calibrated) + encoder W4A16 g32": dict(preset="w8a8", stats=True, text_encoder=ENCODER_W4A16),
        "W4A8-MP (calibrated), encoder FP": dict(preset="w4a8_mp", stats=True),
        "W4A8-MP (calibrated) + encoder W8A16": dict(preset="w4a8_mp", stats=True, text_encoder=dict(preset="w8a16")),
        "W4A8-MP (calibrated) + encoder W4A16 g32": dict(preset="w4a8_mp", stats=True, text_encoder=ENCODER_W4A16),
    },
}
MODELS = os.path.join(ROOT, "reference_models")


class ImageTask:
    """Prompts name a digit and a style; scored on the digit."""

    pipeline = os.path.join(MODELS, "pixart_digits")

    def __init__(self, args):
        self.call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=32, width=32,
                         use_resolution_binning=False, clean_caption=False)
        self.digits = [d for d in range(10) for _ in range(args.per_digit)]
        self.prompts = [prompt_for(d, STYLES[i % len(STYLES)]) for i, d in enumerate(self.digits)]
        self.calibration_prompts = [prompt_for(d, STYLES[(d + 1) % len(STYLES)]) for d in range(10)]

    def accuracy(self, classifier, samples):
        return metrics.accuracy(classifier(samples), torch.tensor(self.digits))

    def features(self, classifier, samples):
        return classifier.features(samples)

    def extra(self, samples, reference):
        return {}

    def save(self, grid, path):
        save_grid(grid, path + ".png")


class VideoTask:
    """Prompts name a digit and a direction; scored on both, plus temporal consistency."""

    pipeline = os.path.join(MODELS, "latte_digits")

    def __init__(self, args):
        self.call = video_call(args.steps, args.guidance)
        self.digits, self.directions, self.prompts = eval_video_prompts(args.per_pair)
        self.calibration_prompts = [video_prompt_for(d, DIRECTIONS[(d + 1) % 4]) for d in range(10)]

    def accuracy(self, classifier, samples):
        digits, directions = classify_clips(classifier, samples)
        ok = [int(d) == e and m == f for d, m, e, f in zip(digits, directions, self.digits, self.directions)]
        return sum(ok) / len(ok)

    def features(self, classifier, samples):  # one feature vector per frame
        return classifier.features(recentre(samples.flatten(0, 1)))

    def extra(self, samples, reference):
        return {"warp_ratio": metrics.temporal_consistency(samples) / metrics.temporal_consistency(reference)}

    def save(self, grid, path):
        save_video_grid(grid, path + ".gif")


def calibration_seeds(task) -> list[int]:
    """The seeds of the task's calibration prompts: 1000, 1001, ... (never the evaluation's)."""
    return list(range(1000, 1000 + len(task.calibration_prompts)))


def calibrate_task(pipe, task):
    """The benchmarks' calibration run: the task's calibration prompts (other prompts and seeds than the
    evaluation's), `calibration_seeds`, the task's steps and guidance."""
    call = {k: v for k, v in task.call.items() if k not in ("num_inference_steps", "guidance_scale")}
    return calibrate(pipe, task.calibration_prompts, task.call["num_inference_steps"], task.call["guidance_scale"],
                     seeds=calibration_seeds(task), **call)


@torch.no_grad()
def evaluate(pipe, task, args, classifier, path, configs: dict | None = None):
    """Rows per config (`{label: ViDiTQConfig kwargs, "stats": uses the calibration}`; default: the suite's)."""
    seeds = list(range(len(task.prompts)))
    if configs is None:
        configs = {label: kwargs for label, kwargs in SUITES[args.suite].items()
                   if "alpha" not in kwargs or kwargs["alpha"] in args.alphas}
    stats = calibrate_task(pipe, task)
    reference = generate(pipe, task.prompts, seeds, **task.call)
    ref_feats = task.features(classifier, reference)
    rows = {"FP": {"psnr": float("inf"), "ssim": 1.0, "eps_rel_mse": 0.0,
                   "accuracy": task.accuracy(classifier, reference), "fd": 0.0, **task.extra(reference, reference)}}
    grid = {"FP": reference[: args.grid]}
    for label, kwargs in configs.items():
        t0 = time.time()
        kwargs = dict(kwargs)
        use_stats = kwargs.pop("stats", False)
        encoder_kwargs = kwargs.pop("text_encoder", None)
        encoder = None if encoder_kwargs is None else quantized_text_encoder(pipe, task, encoder_kwargs)
        encoder_row = {} if encoder is None else {
            **embedding_error(pipe, encoder, task.prompts),
            "encoder_bytes_vs_fp16": weight_bytes(encoder) / fp16_weight_bytes(encoder)}
        runs = []
        # A rotated recipe is one random draw per seed: its PSNR moves by up to ~1 dB between seeds, so rows
        # that rotate are averaged over --rotation-seeds (and show the spread).
        for seed in args.rotation_seeds:
            components = {} if encoder is None else {"text_encoder": encoder}
            if kwargs:  # else the transformer stays in floating point (an encoder-only row)
                config = ViDiTQConfig(**kwargs, calibration=stats if use_stats else None, rotation_seed=seed)
                components["transformer"] = quantize(copy.deepcopy(pipe.transformer), config)
            quantized = with_components(pipe, **components)
            plan = getattr(quantized.transformer.config, "quantization_config", None)
            plan = plan.plan if plan is not None else {"layers": {}}
            samples = generate(quantized, task.prompts, seeds, **task.call)
            alphas = [s.smooth_alpha for s in plan["layers"].values() if s.smooth_alpha is not None]
            runs.append({
                **compare_samples(samples, reference),
                "eps_rel_mse": (epsilon_error(pipe, quantized.transformer, task.prompts[:10], seeds[:10], **task.call)
                                if kwargs else 0.0),
                "accuracy": task.accuracy(classifier, samples),
                "fd": metrics.frechet_distance(task.features(classifier, samples), ref_feats),
                **task.extra(samples, reference),
                **({"alpha_mean": sum(alphas) / len(alphas), "alpha_min": min(alphas), "alpha_max": max(alphas)}
                   if alphas else {}),
                "recipes": summarize_recipes(plan) if kwargs else {},
                **({"avg_bits": average_weight_bits(plan)} if kwargs else {}),
                "bytes_vs_fp16": weight_bytes(quantized.transformer) / fp16_weight_bytes(quantized.transformer),
                **encoder_row,
            })
            if seed == args.rotation_seeds[0]:
                grid[label] = samples[: args.grid]
            if not any(spec.rotation_seed is not None for spec in plan["layers"].values()):
                break  # no layer rotates: the seed changes nothing
        rows[label] = mean_row(runs)
        print(f"  {label}: {time.time() - t0:.0f} s", file=sys.stderr)
    task.save(grid, path)
    return rows


def with_components(pipe, **components):
    """A copy of `pipe` with some components replaced (e.g. quantized ones), progress bars off."""
    new = type(pipe)(**{**pipe.components, **components})
    new.set_progress_bar_config(disable=True)
    return new


def quantized_text_encoder(pipe, task, kwargs: dict):
    """The task's text encoder quantized as it loads, through transformers' quantizer API (as a user does)."""
    folder = os.path.join(task.pipeline, "text_encoder")
    return type(pipe.text_encoder).from_pretrained(folder, dtype=pipe.text_encoder.dtype,
                                                   quantization_config=ViDiTQConfig(**kwargs)).eval()


@torch.no_grad()
def embedding_error(pipe, encoder, prompts: list[str]) -> dict:
    """Cosine and relative squared error of `encoder`'s embeddings of `prompts` vs the pipeline's FP encoder, over
    all the prompts' tokens together (padding left out)."""
    tokens = pipe.tokenizer(prompts, padding=True, return_tensors="pt")
    keep = tokens.attention_mask.bool()
    fp = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0][keep].double()
    quantized = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0][keep].double()
    error = embedding_metrics(quantized, fp)
    return {"emb_cosine": error["cosine"], "emb_rel_error": error["rel_error"]}


def mean_row(runs: list[dict]) -> dict:
    """The runs' numeric metrics averaged; PSNR also as min / max; the first run's recipe mix."""
    row = {k: sum(r[k] for r in runs) / len(runs) for k, v in runs[0].items() if isinstance(v, (int, float))}
    row.update(psnr_min=min(r["psnr"] for r in runs), psnr_max=max(r["psnr"] for r in runs), seeds=len(runs),
               recipes=runs[0]["recipes"])
    return row


def print_table(name, rows):
    video = "warp_ratio" in rows["FP"]
    head = "| config | PSNR dB | SSIM | eps rel. MSE | " + (
        "digit+direction accuracy | FD (classifier features) | warp error / FP |" if video else
        "digit accuracy | FD (classifier features) |")
    encoder = any("emb_cosine" in r for r in rows.values())
    head += " encoder embedding cosine | encoder embedding rel. error |" if encoder else ""
    rule = "|---|---:|---:|---:|---:|---:|" + ("---:|" if video else "") + ("---:|---:|" if encoder else "")
    print(f"\n{name}\n{head}\n{rule}")
    for label, r in rows.items():
        psnr = f"{r['psnr']:.2f}" + (f" ({r['psnr_min']:.2f}..{r['psnr_max']:.2f})" if r.get("seeds", 1) > 1 else "")
        line = f"| {label} | {psnr} | {r['ssim']:.4f} | {r['eps_rel_mse']:.2e} | {r['accuracy']:.3f} | {r['fd']:.3f} |"
        line += f" {r['warp_ratio']:.3f} |" if video else ""
        if encoder:
            line += (f" {r['emb_cosine']:.6f} | {r['emb_rel_error']:.2e} |" if "emb_cosine" in r else " - | - |")
        print(line)
    for bits in ("W8A8", "W4A8"):  # the per-layer search against the best fixed recipe (issue 11)
        fixed = {label: r["psnr"] for label, r in rows.items() if label.startswith(bits) and "search" not in label
                 and not any(k in label for k in ("naive", "SmoothQuant"))}
        search = [(label, r) for label, r in rows.items() if label.startswith(bits) and "search" in label]
        if fixed and search:
            best = max(fixed, key=fixed.get)
            label, r = search[0]
            mix = ", ".join(f"{k} {v}" for k, v in sorted(r["recipes"].items()))
            print(f"\n{bits}: per-layer search {r['psnr']:.2f} dB vs best fixed recipe ({best}) {fixed[best]:.2f} dB "
                  f"= {r['psnr'] - fixed[best]:+.2f} dB; layers chose: {mix}")
    alphas = {label: r for label, r in rows.items() if "alpha_mean" in r}
    if alphas:
        print("\nsmoothing alpha (ViDiT-Q convention) per config: " + "; ".join(
            f"{label}: {r['alpha_min']:.2f}..{r['alpha_max']:.2f} (mean {r['alpha_mean']:.2f})"
            for label, r in alphas.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["image", "video"], default=None, help="run one pipeline only")
    parser.add_argument("--suite", choices=list(SUITES), default="presets", help="which set of configs")
    parser.add_argument("--per-digit", type=int, default=5, help="image: prompts per digit (x10 samples)")
    parser.add_argument("--per-pair", type=int, default=1, help="video: clips per (digit, direction) (x40)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--stress", type=float, default=100.0, help="k of the stressed variants; 0 = skip them")
    parser.add_argument("--stressed-only", action="store_true", help="skip the unstressed pipelines")
    parser.add_argument("--grid", type=int, default=10, help="samples per row in the grids")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "quality"))
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS),
                        help=f"ablation: the global-alpha rows to run (a subset of {ALPHAS})")
    parser.add_argument("--rotation-seeds", type=int, nargs="+", default=[0],
                        help="rotated configs: average over these rotation seeds (PSNR shown as mean (min..max))")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when another job shares the CPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    classifier = load_classifier()
    results = {}
    for kind, task in (("image", ImageTask(args)), ("video", VideoTask(args))):
        if args.only not in (None, kind):
            continue
        pipe = DiffusionPipeline.from_pretrained(task.pipeline)
        pipe.set_progress_bar_config(disable=True)
        variants = {} if args.stressed_only else {kind: (pipe, kind)}
        if args.stress:
            stressed = stress(pipe, k=args.stress)
            stressed.set_progress_bar_config(disable=True)
            variants[f"{kind}, stressed k={args.stress:g} (synthetic)"] = (stressed, f"{kind}-stressed")
        for name, (variant, slug) in variants.items():
            slug += "" if args.suite == "presets" else f"-{args.suite}"
            results[name] = evaluate(variant, task, args, classifier, os.path.join(args.out, slug))
            print_table(name, results[name])
    name = "quality" if args.suite == "presets" else args.suite
    path = os.path.join(args.out, f"{name}-{args.only}.json" if args.only else f"{name}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
