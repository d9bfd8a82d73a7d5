"""End-to-end recipe refinement: per layer, the balancing recipe that makes the whole denoiser closest to FP.

The load-time search (`balance="search"`, :func:`balancing.search_recipe`) scores each layer alone, by its
own output error on FP inputs. That error does not rank recipes end to end (benchmarks/archive/: rotation
raises the W4A8 layer error by a third on average, yet rotated models are not worse). This refines a plan
by greedy coordinate descent on the quantity that matters: layer after layer, each candidate recipe
(smoothing off / on at a few alphas x rotation off / on) is swapped into the quantized denoiser and scored
end to end; the best one stays before the next layer is tried. Objectives:

- ``"eps"``: the denoiser's relative output error vs FP, teacher-forced on the FP trajectory of the prompts
  (every step sees the FP inputs, which are recorded once);
- ``"samples"``: the mean squared error of the final samples vs FP's from the same noise.

Cost: (layers x candidates) denoiser passes over the prompts' steps, e.g. 80 x 8 x 20 steps for the bundled
image pipeline. The result is an ordinary plan (fixed alpha and rotation seed per layer): quantize with
``ViDiTQConfig(plan=plan, calibration=stats)``, and a saved checkpoint reloads it bit-identically.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from . import metrics
from .api import quantize
from .convert import quantized_layer, set_submodule
from .evaluation import denoiser_output, generate, with_transformer
from .layer_spec import LayerSpec
from .quant.hadamard import rotatable

# (alpha or None, rotate?) pairs; a rotated candidate uses the seed the default plan gives the layer.
CANDIDATES = ((None, False), (0.5, False), (0.75, False), (0.9, False),
              (None, True), (0.5, True), (0.75, True), (0.9, True))
OBJECTIVES = ("eps", "samples")


class _EpsObjective:
    """`evaluation.epsilon_error` of the quantized denoiser, with the FP inputs of every step recorded once."""

    def __init__(self, pipe, prompts, seeds, call):
        self.calls = []

        def record(module, args, kwargs, output):
            self.calls.append((args, dict(kwargs), denoiser_output(output).float()))

        handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
        try:
            generate(pipe, prompts, seeds, **call)
        finally:
            handle.remove()

    @torch.no_grad()
    def __call__(self, quantized_pipe) -> float:
        errors = [metrics.relative_mse(denoiser_output(quantized_pipe.transformer(*a, **k)).float(), ref)
                  for a, k, ref in self.calls]
        return sum(errors) / len(errors)


class _SamplesObjective:
    """Mean squared error of the final samples vs FP's, from the same noise."""

    def __init__(self, pipe, prompts, seeds, call):
        self.prompts, self.seeds, self.call = prompts, seeds, call
        self.reference = generate(pipe, prompts, seeds, **call)

    def __call__(self, quantized_pipe) -> float:
        return float((generate(quantized_pipe, self.prompts, self.seeds, **self.call) - self.reference).square().mean())


def _recipe(spec: LayerSpec) -> tuple:
    return spec.smooth_alpha, spec.rotation_seed


def _candidate_spec(spec: LayerSpec, seed: int, alpha: float | None, rotate: bool) -> LayerSpec:
    return spec.with_recipe(alpha, seed if rotate else None)


@torch.no_grad()
def refine_recipes(pipe, config, prompts: Sequence[str], seeds: Sequence[int], objective: str = "eps",
                   candidates: Sequence[tuple] = CANDIDATES, **call) -> tuple[dict, list[float]]:
    """`(plan, objective after each layer)`: `config`'s plan with each A8 layer's recipe chosen end to end.

    `config`: a `ViDiTQConfig` with calibration statistics (its balancing gives the starting point, e.g. the
    load-time search); `prompts` / `seeds`: what the objective is measured on (e.g. the calibration prompts);
    `call`: pipeline-call arguments (num_inference_steps, guidance_scale, size). `pipe` is not modified.
    """
    from .calibration import CalibrationStats

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if not isinstance(config.calibration, (CalibrationStats, str)):
        raise ValueError("refine_recipes chooses smoothing per layer and needs calibration statistics: pass "
                         "ViDiTQConfig(..., calibration=viditq_diffusers.calibrate(pipe, prompts)).")
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"give one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds).")
    config = copy.deepcopy(config)  # also what quantized_layer builds each candidate with: statistics loaded
    if isinstance(config.calibration, str):
        config.calibration = CalibrationStats.load(config.calibration)
    quantized = quantize(copy.deepcopy(pipe.transformer), config)
    plan = copy.deepcopy(quantized.config.quantization_config.plan)
    quantized_pipe = with_transformer(pipe, quantized)
    score = (_EpsObjective if objective == "eps" else _SamplesObjective)(pipe, list(prompts), list(seeds), call)
    best = score(quantized_pipe)
    trace = [best]
    names = [n for n, s in plan["layers"].items() if s.act_bits < 16 and s.act_scale is None]
    position = {name: i for i, name in enumerate(plan["layers"])}  # build_plan seeds layer i with rotation_seed + i
    for name in tqdm(names, desc="Refining recipes", unit="layer", disable=None):
        spec = plan["layers"][name]
        linear = pipe.transformer.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        seed = spec.rotation_seed
        seed = config.rotation_seed + position[name] if seed is None else seed
        chosen, chosen_layer = spec, quantized.get_submodule(name)
        for alpha, rotate in candidates:
            if rotate and not rotatable(spec.in_features):
                continue
            candidate = _candidate_spec(spec, seed, alpha, rotate)
            if _recipe(candidate) == _recipe(chosen):
                continue
            layer = quantized_layer(name, linear.weight.detach(), bias, candidate, config)
            set_submodule(quantized, name, layer)
            error = score(quantized_pipe)
            if error < best:
                best, chosen, chosen_layer = error, candidate, layer
        set_submodule(quantized, name, chosen_layer)
        plan["layers"][name] = chosen
        trace.append(best)
    return plan, trace
