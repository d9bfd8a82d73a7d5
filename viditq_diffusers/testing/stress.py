"""Outlier-stress transform: inject large, timestep-varying channel outliers into an adaLN-single DiT, exactly
preserving its function. SYNTHETIC: the result is a test subject for quantizers, not a better model.

Real released DiTs (PixArt, OpenSORA) carry large static and timestep-varying channel outliers in the inputs
of their linear layers; small models trained briefly do not. :func:`stress` makes them appear in the inputs of
``attn1.to_q/to_k/to_v`` and ``ff.net.0.proj`` of every ``BasicTransformerBlock`` with
``norm_type="ada_norm_single"`` (PixArt's ``transformer_blocks``; Latte's ``transformer_blocks`` and
``temporal_transformer_blocks``), while the model's output stays the same (up to float rounding).

How diffusers computes the modulation (``BasicTransformerBlock.forward``, ``AdaLayerNormSingle``)::

    t = adaln_single.linear(silu(emb(timestep)))             # [B, 6*D], ONE tensor SHARED by all blocks
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (block.scale_shift_table[None]
                                                                      + t.reshape(B, 6, D)).chunk(6, dim=1)
    attn1 input = norm1(h) * (1 + scale_msa) + shift_msa      # -> to_q / to_k / to_v
    ff input    = norm2(h) * (1 + scale_mlp) + shift_mlp      # -> ff.net.0.proj

Construction (factor ``k``, channel sets ``J_msa`` / ``J_mlp`` drawn once from ``seed`` and shared by all blocks,
because the linear producing ``t`` is shared: its rows cannot be scaled for one block only)::

    rows of adaln_single.linear (weight and bias) for chunks shift_msa, scale_msa at J_msa and shift_mlp,
        scale_mlp at J_mlp are multiplied by k                           =>  t'_j = k * t_j
    every block's table: scale'_j = k * (1 + scale_j) - 1,  shift'_j = k * shift_j
        =>  1 + scale'_j + t'_j = k * (1 + scale_j + t_j)  and  shift'_j + t'_j = k * (shift_j + t_j)
    so the modulated input channel j is exactly k times larger: x'_j = k * x_j (at every timestep);
    every block's to_q / to_k / to_v (for J_msa) and ff.net.0.proj (for J_mlp) input column j is divided by k
        =>  W' x' = W x: every linear output, hence the model output, is unchanged.

The gates (chunks 2 and 5) and everything else are untouched; ``t`` feeds only the blocks (the final layer uses
``embedded_timestep``, not ``t``). Since ``x_j = norm(h)_j * (1 + scale_j + t_j(tau)) + shift_j + t_j(tau)``, the
outlier magnitude follows the timestep ``tau``, so per-channel absmax ratios vary with the timestep.
Measure them with :func:`channel_absmax_ratio`. Arithmetic is done in float64 and cast back to each
parameter's dtype.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

__all__ = ["stress", "channel_absmax_ratio", "modulation_range", "stressed_blocks"]

# chunk indices in the 6*D adaLN-single vector (see module docstring)
_SHIFT_MSA, _SCALE_MSA, _SHIFT_MLP, _SCALE_MLP = 0, 1, 3, 4


def stressed_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every adaLN-single block: ``transformer_blocks`` and, if present (Latte),
    ``temporal_transformer_blocks``. Raises ``TypeError`` if the model is not an adaLN-single DiT."""
    if getattr(transformer, "adaln_single", None) is None:
        raise TypeError(f"{type(transformer).__name__} has no `adaln_single`: stress() needs a PixArt/Latte-style "
                        "DiT with norm_type='ada_norm_single'")
    out = []
    for attr in ("transformer_blocks", "temporal_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, attr, None) or []):
            if getattr(block, "norm_type", None) != "ada_norm_single" or not hasattr(block, "scale_shift_table"):
                raise TypeError(f"{attr}.{i} is not an ada_norm_single BasicTransformerBlock")
            for lin in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.ff.net[0].proj):
                if type(lin) is not nn.Linear:  # quantized / fused / LoRA-wrapped layers: stress before those
                    raise TypeError(f"{attr}.{i}: expected plain nn.Linear, got {type(lin).__name__}")
            out.append((f"{attr}.{i}", block))
    return out


@torch.no_grad()
def modulation_range(transformer: nn.Module, timesteps: Sequence[int] = range(0, 1000, 20),
                     floor: float = 0.3) -> dict[str, torch.Tensor]:
    """How much each channel's modulation moves with the timestep, per pair: ``{"msa": [D], "mlp": [D]}``.

    For pair (shift, scale) and channel j the modulation amplitude is ``a_j(tau) = |1 + scale_j(tau)| +
    |shift_j(tau)|`` (block table + shared ``t(tau)``). Per block the score is ``(max_tau a_j - min_tau a_j) /
    m`` with ``m`` the median over channels of the mean amplitude, and 0 where ``min_tau a_j < floor * m``
    (an outlier that vanishes at some timestep would not stay one); scores are averaged over the blocks.
    High-scoring channels give outliers that are always large and whose size follows the timestep."""
    ada = transformer.adaln_single
    n = len(timesteps)
    cond = {"resolution": None, "aspect_ratio": None}
    if getattr(ada, "use_additional_conditions", False):  # PixArt at 1024 px also embeds size and aspect ratio
        cond = {"resolution": torch.full((n, 2), 1024.0), "aspect_ratio": torch.ones(n, 1)}
    t, _ = ada(torch.as_tensor(list(timesteps)), added_cond_kwargs=cond, batch_size=n,
               hidden_dtype=ada.linear.weight.dtype)
    t = t.double().reshape(n, 6, -1)
    out = {}
    for pair, (c_shift, c_scale) in {"msa": (_SHIFT_MSA, _SCALE_MSA), "mlp": (_SHIFT_MLP, _SCALE_MLP)}.items():
        scores = []
        for _, block in stressed_blocks(transformer):
            table = block.scale_shift_table.double()
            amp = (1 + table[c_scale] + t[:, c_scale]).abs() + (table[c_shift] + t[:, c_shift]).abs()  # [n, D]
            m = amp.mean(0).median()
            score = (amp.amax(0) - amp.amin(0)) / m
            scores.append(torch.where(amp.amin(0) >= floor * m, score, torch.zeros_like(score)))
        out[pair] = torch.stack(scores).mean(0)
    return out


def _channel_sets(channels, dim: int, seed: int, transformer: nn.Module, pick: str) -> dict[str, torch.Tensor]:
    """``{"msa": idx, "mlp": idx}``. ``channels``: an int (that many channels per pair, picked per ``pick``), a
    sequence of indices (used for both pairs) or a dict with keys ``"msa"`` and ``"mlp"``."""
    if isinstance(channels, int):
        if not 0 < channels <= dim:
            raise ValueError(f"channels must be in 1..{dim}, got {channels}")
        if pick == "time_varying":
            return {p: r.topk(channels).indices.sort().values for p, r in modulation_range(transformer).items()}
        if pick != "random":
            raise ValueError(f"pick must be 'time_varying' or 'random', got {pick!r}")
        g = torch.Generator().manual_seed(seed)
        return {p: torch.randperm(dim, generator=g)[:channels].sort().values for p in ("msa", "mlp")}
    if isinstance(channels, dict):
        sets = {p: torch.as_tensor(channels[p], dtype=torch.long) for p in ("msa", "mlp")}
    else:
        idx = torch.as_tensor(channels, dtype=torch.long)
        sets = {"msa": idx, "mlp": idx}
    for p, idx in sets.items():
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= dim or idx.unique().numel() != idx.numel():
            raise ValueError(f"{p} channels must be distinct indices in [0, {dim}), got {idx.tolist()}")
    return sets


@torch.no_grad()
def _stress_transformer_(transformer: nn.Module, k: float, sets: dict[str, torch.Tensor]) -> None:
    """Apply the construction of the module docstring in place."""
    blocks = stressed_blocks(transformer)
    lin = transformer.adaln_single.linear
    dim = lin.out_features // 6

    def scaled(p: torch.Tensor, fn) -> torch.Tensor:  # do the arithmetic in float64, cast back
        return fn(p.detach().double()).to(p.dtype)

    chunks = {"msa": (_SHIFT_MSA, _SCALE_MSA), "mlp": (_SHIFT_MLP, _SCALE_MLP)}
    # 1) shared adaLN-single linear: rows of the shift and scale chunks at the chosen channels, times k
    rows = torch.cat([c * dim + sets[p] for p, cs in chunks.items() for c in cs])
    lin.weight[rows] = scaled(lin.weight[rows], lambda w: w * k)
    if lin.bias is not None:
        lin.bias[rows] = scaled(lin.bias[rows], lambda b: b * k)
    for _, block in blocks:
        table = block.scale_shift_table  # [6, D]
        for p, (c_shift, c_scale) in chunks.items():
            j = sets[p]
            # 2) per-block table: shift' = k * shift, scale' = k * (1 + scale) - 1
            table[c_shift, j] = scaled(table[c_shift, j], lambda s: s * k)
            table[c_scale, j] = scaled(table[c_scale, j], lambda s: k * (1.0 + s) - 1.0)
        # 3) the consuming linears: input columns / k
        for layer, p in ((block.attn1.to_q, "msa"), (block.attn1.to_k, "msa"), (block.attn1.to_v, "msa"),
                         (block.ff.net[0].proj, "mlp")):
            j = sets[p]
            layer.weight[:, j] = scaled(layer.weight[:, j], lambda w: w / k)


def stress(pipe_or_transformer, seed: int = 0, k: float = 100.0, channels: int | Sequence[int] | dict = 4,
           pick: str = "time_varying"):
    """Return an outlier-stressed copy (see the module docstring); the input is never modified.

    Args:
        pipe_or_transformer: a diffusers pipeline with a ``transformer`` (PixArt/Latte) or such a transformer.
        seed: seeds the choice of channels when ``channels`` is an int and ``pick="random"``.
        k: outlier factor; the chosen input channels of attn1.to_q/k/v and ff.net.0.proj grow k-fold.
        channels: number of channels per pair (msa, mlp), explicit indices (both pairs), or
            ``{"msa": [...], "mlp": [...]}``. One set per pair is shared by all blocks (see docstring).
        pick: for an int ``channels``: ``"time_varying"`` takes the channels whose modulation moves most
            with the timestep (:func:`modulation_range`), so the outliers vary with it as in real DiTs;
            ``"random"`` draws them from ``seed``.

    Returns:
        For a transformer: a stressed deep copy. For a pipeline: a new pipeline of the same class whose
        transformer is a stressed deep copy and whose scheduler is a deep copy (it holds state); the other
        components (text encoder, tokenizer, VAE) are shared with the input, not copied. The stressed
        transformer carries ``viditq_stress = {"synthetic": True, "seed", "k", "channels"}`` as a label.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    is_pipe = not isinstance(pipe_or_transformer, nn.Module)
    transformer = pipe_or_transformer.transformer if is_pipe else pipe_or_transformer
    stressed_blocks(transformer)  # validate before copying
    sets = _channel_sets(channels, transformer.adaln_single.linear.out_features // 6, seed, transformer, pick)
    new = copy.deepcopy(transformer)
    _stress_transformer_(new, float(k), sets)
    new.viditq_stress = {"synthetic": True, "seed": seed, "k": float(k), "pick": pick,
                         "channels": {p: v.tolist() for p, v in sets.items()}}
    if not is_pipe:
        return new
    components = dict(pipe_or_transformer.components, transformer=new)
    if components.get("scheduler") is not None:
        components["scheduler"] = copy.deepcopy(components["scheduler"])
    return type(pipe_or_transformer)(**components)


@torch.no_grad()
def channel_absmax_ratio(transformer: nn.Module, inputs: dict) -> dict[str, float]:
    """Per-layer outlier ratio ``max_j absmax_j / median_j absmax_j`` of the inputs of ``attn1.to_q`` and
    ``ff.net.0.proj`` in every adaLN-single block, where ``absmax_j`` is the absolute maximum of input channel
    ``j`` over all tokens of one forward pass ``transformer(**inputs)``.

    Returns ``{"<blocks>.<i>.attn1.to_q": ratio, "<blocks>.<i>.ff.net.0.proj": ratio, ...}``.
    """
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], x) if name in stats else x  # several calls per layer
        return fn

    for bname, block in stressed_blocks(transformer):
        for lname, layer in (("attn1.to_q", block.attn1.to_q), ("ff.net.0.proj", block.ff.net[0].proj)):
            hooks.append(layer.register_forward_pre_hook(hook(f"{bname}.{lname}")))
    try:
        transformer(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: float(a.max() / a.median().clamp_min(torch.finfo(a.dtype).tiny)) for n, a in stats.items()}
