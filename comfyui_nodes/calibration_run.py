"""ViDiT-Q calibration driven by ComfyUI's own sampler.

The core's `calibrate` hooks the denoiser's linear inputs and buckets them by the denoiser's timestep
input (ComfyUI's `timesteps`: the sigma mapped to the model's time scale, see `timestep_range`); here each
"prompt" is one (positive, negative) conditioning pair, sampled with ComfyUI's KSampler code path (its progress bar
shows in the UI). ComfyUI batches the CFG halves as [cond, uncond], not diffusers' [uncond, cond], and
may run them as separate calls, so no per-CFG-half statistics are recorded (guidance_scale=1 for the
core); the sampler's cfg is kept in the statistics' settings.
"""

from __future__ import annotations

import nodes

from viditq_diffusers.calibration import CalibrationStats, calibrate

from .patching import loaded_tree, plan_of


def calibrate_model(model, positives: list, negatives: list, latent: dict, seed: int, steps: int, cfg: float,
                    sampler_name: str, scheduler: str, timestep_buckets: int = 4) -> CalibrationStats:
    if plan_of(model) is not None:
        raise ValueError("ViDiT-Q Calibrate needs the floating-point MODEL; this one is already quantized.")
    if len(negatives) not in (1, len(positives)):
        raise ValueError(f"got {len(positives)} positive and {len(negatives)} negative conditionings; pass one "
                         f"negative, or one per positive.")
    pairs = {f"pair {i}": (pos, negatives[i % len(negatives)]) for i, pos in enumerate(positives)}
    tree = loaded_tree(model)  # hooks go on the FP modules, not on a quantized clone's leftovers

    def run(key, generator):
        positive, negative = pairs[key]
        nodes.common_ksampler(model, generator.initial_seed(), steps, cfg, sampler_name, scheduler, positive,
                              negative, latent)

    return calibrate(tree, list(pairs), num_inference_steps=steps, guidance_scale=1.0,
                     seeds=[seed + i for i in range(len(pairs))], timestep_buckets=timestep_buckets, run=run,
                     timestep_range=timestep_range(model),
                     comfyui={"cfg": cfg, "sampler": sampler_name, "scheduler": scheduler})


def timestep_range(model) -> float:
    """The denoiser's largest timestep input: ~1000 for discrete-time and SD3 / Wan flow models, 1 for Flux
    (its model sampling feeds sigmas as they are), so the timestep buckets span every model's trajectory."""
    sampling = model.get_model_object("model_sampling")
    return float(sampling.timestep(sampling.sigma_max))
