"""Re-train the shipped mirror LoRA (`reference_models/pixart_digits_lora`) on the FP32, W8A8 and W4A8 transformers
of `reference_models/pixart_digits`: same recipe, seed and number of steps; step time, peak RSS, final loss and the
mirror accuracy of each result, side by side.

The training is `reference/train_lora.py`'s (`training_data`, `add_lora`, `train_steps`: its recipe, rank 8 on the
80 attention and feed-forward linears, AdamW 2e-3, batch 64, FP32 activations), here for a fixed number of steps
instead of a time budget. On the quantized transformers the LoRA trains through the integer layers (their
backward is the straight-through gradient of the dequantized weight; the codes stay frozen). W8A8 and W4A8 are
`ViDiTQConfig(preset=..., calibration=stats)` with the statistics `reference.train_lora.evaluate` calibrates (10
prompts), computed once here and shared by the variants.

Each variant runs in its own child process: it loads the pipeline (quantizing the transformer), encodes the
training pool, trains, and reads its peak RSS (`ru_maxrss`: loading, encoding and training, everything resident)
before it samples. Then it scores the trained LoRA on the model it was trained on, as `evaluate` does: seeded
samples of the asymmetric digits, read by the digit classifier as drawn and flipped back ("mirror accuracy" =
recognised flipped back). s / step is the mean over the steps after the first.

    OMP_NUM_THREADS=1 python -m benchmarks.lora_training [--steps 362] [--variants fp32 w8a8 w4a8] [--threads 1]
    python -m benchmarks.lora_training --smoke     # a few tiny steps: checks that it runs, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile

import torch

from benchmarks.child_process import run_json_child
from reference.train_lora import PIPELINE, RECIPE, add_lora, calibrate_digits, evaluation_set, mirror_score, \
    sampling_call, train_steps, training_data

VARIANTS = {"fp32": None, "w8a8": "w8a8", "w4a8": "w4a8"}  # variant -> ViDiT-Q preset (None: the FP32 transformer)
SHIPPED_STEPS = 362  # the shipped LoRA's run (8 min on 1 thread; its README)
SMOKE = dict(steps=3, pool=32, batch=4, samples=7, sample_steps=2)
COLUMNS = ("transformer", "steps", "s / step", "peak RSS MiB", "final loss", "mirror accuracy", "vs FP32 (points)",
           "mirrored score")


def run_variant(variant: str, args, stats_path: str | None) -> dict:
    """Load, train and score one variant in this process; the result as a JSON-able dict."""
    import diffusers

    from reference.classifier import load_classifier
    from viditq_diffusers import ViDiTQConfig
    from viditq_diffusers.calibration import CalibrationStats
    from viditq_diffusers.evaluation import generate

    preset = VARIANTS[variant]
    config = None if preset is None else ViDiTQConfig(preset=preset, calibration=CalibrationStats.load(stats_path))
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(args.pipeline, quantization_config=config)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.requires_grad_(False)
    recipe = argparse.Namespace(**{**RECIPE, "batch": args.batch, "seed": args.seed})
    data = training_data(pipe, args.pool, args.seed)
    _, params = add_lora(pipe.transformer, recipe.rank, "mirror", args.seed)
    trained = train_steps(pipe.transformer, data, params, recipe, steps=args.steps, log_every=0)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    digits, prompts = evaluation_set(args.samples)
    samples = generate(pipe, prompts, list(range(len(prompts))), **sampling_call(args.sample_steps))
    timed = trained["step_seconds"][1:] or trained["step_seconds"]
    return dict(variant=variant, steps=trained["steps"], step_s=sum(timed) / len(timed), peak_rss_mib=peak_rss_mib,
                final_loss=trained["final_loss"], **mirror_score(load_classifier(), samples, digits))


def run_child(variant: str, args, stats_path: str | None) -> dict:
    """One variant in its own process (its peak RSS is its own); its last stdout line is the result as JSON."""
    command = [sys.executable, "-m", "benchmarks.lora_training", "--child", variant, "--steps", str(args.steps),
               "--pool", str(args.pool), "--batch", str(args.batch), "--samples", str(args.samples),
               "--sample-steps", str(args.sample_steps), "--seed", str(args.seed), "--threads", str(args.threads),
               "--pipeline", args.pipeline]
    if stats_path is not None:
        command += ["--stats", stats_path]
    return run_json_child(command, variant=variant)


def table(results: list[dict]) -> str:
    """Markdown table, one row per variant; a failed variant keeps its row with the reason."""
    fp = next((r for r in results if r.get("variant") == "fp32" and "error" not in r), None)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in results:
        name = "FP32" if r["variant"] == "fp32" else f"ViDiT-Q {r['variant'].upper()}"
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        versus = "-" if fp is None or r is fp else f"{100 * (r['flipped'] - fp['flipped']):+.1f}"
        lines.append(f"| {name} | {r['steps']} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['final_loss']:.4f} "
                     f"| {r['flipped']:.1%} | {versus} | {r['mirrored']:+.2f} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=SHIPPED_STEPS, help="training steps, every variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--pool", type=int, default=RECIPE["pool"], help="mirrored training images, VAE-encoded once")
    p.add_argument("--batch", type=int, default=RECIPE["batch"])
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--samples", type=int, default=70, help="samples scored for the mirror accuracy")
    p.add_argument("--sample-steps", type=int, default=20, help="sampling steps (and the calibration's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pipeline", default=PIPELINE)
    p.add_argument("--smoke", action="store_true", help=f"tiny defaults ({SMOKE}): checks that it runs")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one variant, result as JSON
    p.add_argument("--stats", help=argparse.SUPPRESS)  # the calibration statistics file, for a child
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE)  # the smoke sizes as defaults: a flag given with --smoke still wins
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        from viditq_diffusers.kernels import warmup

        warmup(verbose=False)  # the C++ kernels loaded before anything is timed
        print(json.dumps(run_variant(args.child, args, args.stats)))
        return []

    import diffusers

    print(f"Mirror LoRA (rank {RECIPE['rank']}, lr {RECIPE['lr']}, batch {args.batch}, pool {args.pool}, seed "
          f"{args.seed}) trained {args.steps} steps on each transformer, {args.threads} thread(s), one child process "
          f"each; mirror accuracy on {args.samples} samples, {args.sample_steps} sampling steps.", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        stats_path = None
        if any(VARIANTS[v] for v in args.variants):
            fp = diffusers.PixArtAlphaPipeline.from_pretrained(args.pipeline)
            fp.set_progress_bar_config(disable=True)
            stats_path = os.path.join(folder, "calibration.safetensors")
            calibrate_digits(fp, args.sample_steps).save(stats_path)
            del fp
        for variant in args.variants:
            results.append(run_child(variant, args, stats_path))
            r = results[-1]
            print(f"  {variant}: " + (r.get("error") or f"{r['step_s']:.2f} s / step, loss {r['final_loss']:.4f}"),
                  flush=True)
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    main()
