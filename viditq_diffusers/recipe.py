"""Each layer's channel-balancing recipe, decided when its weight is read: smoothing factors, automatic alpha.

The plan fixes per layer whether it is smoothed (`smooth_alpha`: a number, or "auto" / "search") and rotated
(`rotation_seed`). The smoothing `m_j = w_j^alpha / a_j^(1-alpha)` needs the layer's weight, which the
diffusers loader hands over one layer at a time, so it is computed here, when the weight is read:
:func:`decide_layer` turns "auto" into the chosen alpha, computes `m`, and for static activation
scales (SmoothQuant) the scale of the smoothed input. It returns the decided plan entry, which the caller
puts in the plan, so a saved checkpoint records what was chosen.

Automatic alpha: per layer, the alpha that minimises the layer's output error
`|| Q(x m R) Q(W/m R)^T - x W^T ||^2` over the calibration's sampled input tokens (drawn across timestep
buckets and both CFG halves), first on a grid, then refined around the best grid point.

Recipe search (`smooth_alpha="search"`, the default with calibration): per layer, the same error decides
the whole recipe among smoothing off / on (alpha searched as above, or the config's fixed alpha) x rotation
off / on. No single recipe is best everywhere: rotation helps 8-bit activations with heavy channels but
gaussianises the rows of flat 4-bit weights. Ties go to the simpler recipe.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .layer_spec import UNDECIDED_ALPHAS, LayerSpec, recipe_label
from .plan import calibration_absmax
from .quant.channel_balance import balance_activation, balance_weight, smoothing_factors
from .quant.formats import dequantize_weight, qrange, quantize_activation_per_token, quantize_weight

ALPHA_GRID = tuple(i / 10 for i in range(11))
REFINE_STEP = 0.025


def layer_error(weight: torch.Tensor, tokens: torch.Tensor, spec: LayerSpec, smoothing: torch.Tensor | None,
                reference: torch.Tensor | None = None) -> float:
    """Squared output error of the quantized layer (fake quantization, float32) on `tokens [S, in]`;
    `reference`: the FP output `tokens @ weight^T`, when the caller already has it."""
    seed = spec.rotation_seed
    w = balance_weight(weight.double(), smoothing, seed)
    codes, scale, zero = quantize_weight(w, spec.weight_bits, spec.group_size, spec.symmetric, spec.weight_per_tensor)
    wq = dequantize_weight(codes, scale, zero).float()
    x = balance_activation(tokens.float(), smoothing, seed)
    xq, x_scale = quantize_activation_per_token(x, spec.act_bits)
    y = (xq.float() * x_scale) @ wq.T
    if reference is None:
        reference = tokens.float() @ weight.float().T
    return float((y - reference).square().sum())


def _best_alpha(error) -> tuple[float, float]:
    """(alpha, error) minimising `error(alpha)`: the grid, then +-2 refinement steps around its best."""
    errors = {a: error(a) for a in ALPHA_GRID}
    best = min(errors, key=errors.get)
    for k in (-2, -1, 1, 2):
        a = round(best + k * REFINE_STEP, 6)
        if 0 <= a <= 1 and a not in errors:
            errors[a] = error(a)
    best = min(errors, key=errors.get)
    return best, errors[best]


def _smoothed_error(weight, act_absmax, tokens, spec, reference):
    return lambda alpha: layer_error(weight, tokens, spec, smoothing_factors(act_absmax.float(), weight, alpha),
                                     reference)


def search_alpha(weight: torch.Tensor, act_absmax: torch.Tensor, tokens: torch.Tensor, spec: LayerSpec) -> float:
    """The alpha in [0, 1] with the smallest :func:`layer_error`: grid, then +-2 refinement steps."""
    reference = tokens.float() @ weight.float().T  # the FP output: the same for every candidate
    return _best_alpha(_smoothed_error(weight, act_absmax, tokens, spec, reference))[0]


def search_recipe(weight: torch.Tensor, act_absmax: torch.Tensor, tokens: torch.Tensor, spec: LayerSpec,
                  alpha: float | str = "auto") -> tuple[float | None, int | None, dict]:
    """The layer's balancing recipe with the smallest :func:`layer_error`.

    Candidates: smoothing off, or on with `alpha` ("auto": searched); times rotation off, or on with
    `spec.rotation_seed` (when it is not None). Returns `(alpha or None, rotation seed or None,
    {recipe label: relative error})`, the relative error being `error / ||x W^T||^2`.
    """
    reference = tokens.float() @ weight.float().T
    norm = float(reference.square().sum()) or 1.0
    errors: dict[tuple, float] = {}
    seeds = [None] if spec.rotation_seed is None else [None, spec.rotation_seed]
    for seed in seeds:
        candidate = replace(spec, rotation_seed=seed)
        errors[(None, seed)] = layer_error(weight, tokens, candidate, None, reference)
        smoothed = _smoothed_error(weight, act_absmax, tokens, candidate, reference)
        a, e = _best_alpha(smoothed) if alpha == "auto" else (float(alpha), smoothed(float(alpha)))
        errors[(a, seed)] = e
    best_alpha, best_seed = min(errors, key=errors.get)  # insertion order: ties go to the simpler recipe
    return best_alpha, best_seed, {recipe_label(a, s): e / norm for (a, s), e in errors.items()}


def decide_layer(name: str, weight: torch.Tensor, spec: LayerSpec, config) -> tuple[LayerSpec, torch.Tensor | None]:
    """`(decided spec, smoothing factors or None)`: the weight-dependent parts of `spec` decided."""
    if spec.smooth_alpha is None:
        return spec, None
    stats = config.calibration
    absmax = calibration_absmax(stats, name, config.preset).to(weight.device)
    alpha = spec.smooth_alpha
    if alpha in UNDECIDED_ALPHAS:
        tokens = stats.sample_tokens.get(name) if hasattr(stats, "sample_tokens") else None
        if tokens is None or len(tokens) == 0:
            raise ValueError(f"balance='search' and alpha='auto' need sampled calibration tokens for layer '{name}'; "
                             f"recalibrate with viditq_diffusers.calibrate, or pass a fixed alpha and balance.")
        tokens = tokens.to(weight.device)
        if alpha == "auto":
            alpha = search_alpha(weight, absmax, tokens, spec)
        else:
            alpha, seed, _ = search_recipe(weight, absmax, tokens, spec, config.alpha)
            spec = spec.with_recipe(None if alpha is None else float(alpha), seed)
            if alpha is None:
                return spec, None
    spec = replace(spec, smooth_alpha=float(alpha))
    smoothing = smoothing_factors(absmax.float(), weight, float(alpha))
    if config.static_acts:  # SmoothQuant: one static scale for the smoothed input, whose absmax is max_j a_j m_j
        spec = replace(spec, act_scale=float((absmax.float() * smoothing).max()) / qrange(spec.act_bits)[1])
    return spec, smoothing
