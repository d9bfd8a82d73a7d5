"""Metric-decoupled sensitivity: how much each layer group, quantized alone, costs on each metric.

For every group (role x block range, `roles.group_layers`) and every candidate precision, the group alone is
quantized (every other layer stays FP), the pipeline generates from the FP run's noise, and a scorer rates
the samples. The degradation on a metric is the FP score minus the quantized score (scorers return "higher
is better" values: minus the relative squared error vs FP, classifier accuracy, minus FD, minus warp
error...). ViDiT-Q's point is that each group has a metric it dominates: cross-attention the text
alignment, temporal attention the temporal consistency, FFN and self-attention the visual fidelity
(`DOMINANT_METRIC`); every metric is recorded for every group anyway, so the allocation can hold all of
them within tolerance.

A cheap proxy runs alongside: the quantized denoiser's relative epsilon error, teacher-forced on the FP
trajectory, split per metric family (`proxy_errors`). `rank_agreement` reports how well it ranks groups.

The table is written to a JSON cache after every entry (atomically), so an interrupted search resumes where
it stopped, and options or groups added later are measured on top of it; a cache made with other prompts,
seeds, scorer or settings, or that defines an option or group otherwise, is refused rather than mixed in.
Under `accelerate launch --num_processes N` the runs are split between the processes (each writes its own
`CACHE.rankI` shard as it goes) and gathered at the end.
"""

from __future__ import annotations

import copy
import os

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..config import ViDiTQConfig
from ..api import quantize
from ..evaluation import denoiser_output, generate, with_transformer
from ..jsonio import read_json, write_json
from ..plan import stored_weight_bits
from ..roles import Role

FIDELITY, TEXT, TEMPORAL = "fidelity", "text_alignment", "temporal_consistency"
DOMINANT_METRIC = {
    **{role: TEXT for role in (Role.CROSS_ATTN_Q, Role.CROSS_ATTN_KV, Role.CROSS_ATTN_OUT, Role.JOINT_ATTN_CONTEXT,
                               Role.FFN_CONTEXT)},
    **{role: TEMPORAL for role in (Role.TEMPORAL_ATTN, Role.TEMPORAL_FFN)},
}


def group_role(group: str) -> Role:
    """The role in a group name such as `"cross_attn_kv[0-3]"` or `"single_transformer_blocks/modulation[0-1]"`."""
    return Role(group.rpartition("/")[2].partition("[")[0])


def dominant_metric(group: str) -> str:
    return DOMINANT_METRIC.get(group_role(group), FIDELITY)


def stored_bits(plan: dict, layers: list[str]) -> float:
    """Bits the layers' quantized weights take as planned (codes, group scales, both timestep-wise copies)."""
    return sum(stored_weight_bits(spec) * spec.in_features * spec.out_features
               for name, spec in plan["layers"].items() if name in layers)


def quantize_only(transformer, layers: list[str], all_layers: list[str], options: dict, calibration=None):
    """A copy of `transformer` with only `layers` quantized (ViDiTQConfig kwargs `options`)."""
    others = sorted(set(all_layers) - set(layers))
    config = ViDiTQConfig(**options, calibration=calibration, modules_to_not_convert=others)
    return quantize(copy.deepcopy(transformer), config)


def _split_cfg(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    uncond, cond = output.float().chunk(2)
    return uncond, cond


@torch.no_grad()
def proxy_errors(pipe, quantized, prompts: list[str], seeds: list[int], **call) -> dict[str, float]:
    """Relative epsilon errors of `quantized` vs the FP denoiser on the FP trajectory, per metric family:
    fidelity = the conditional prediction; text alignment = the guidance direction (cond - uncond);
    temporal consistency = the frame-to-frame differences (video outputs `[B, C, F, H, W]` only).
    Needs classifier-free guidance (the batch holds [uncond, cond])."""
    sums: dict[str, list[float]] = {FIDELITY: [], TEXT: []}

    def compare(module, args, kwargs, output):
        fp, q = denoiser_output(output), denoiser_output(quantized(*args, **kwargs))
        (fp_u, fp_c), (q_u, q_c) = _split_cfg(fp), _split_cfg(q)
        sums[FIDELITY].append(metrics.relative_mse(q_c, fp_c))
        sums[TEXT].append(metrics.relative_mse(q_c - q_u, fp_c - fp_u))
        if fp.ndim == 5 and fp.shape[2] > 1:
            sums.setdefault(TEMPORAL, []).append(metrics.relative_mse(q_c.diff(dim=2), fp_c.diff(dim=2)))

    if call.get("guidance_scale", 1.0) <= 1.0:
        raise ValueError("proxy_errors splits the CFG batch: call it with guidance_scale > 1")
    handle = pipe.transformer.register_forward_hook(compare, with_kwargs=True)
    try:
        generate(pipe, prompts, seeds, **call)
    finally:
        handle.remove()
    return {k: float(sum(v) / len(v)) for k, v in sums.items()}


def _load_cache(path: str | None, fingerprint: dict, groups: dict, options: dict) -> dict:
    """The cache file's content (`fingerprint`, `groups`, `options`, `table`), or an empty one. Entries of
    groups and options the cache defines the same way are reused, so adding an option (or a group) to a
    finished search measures only what is new."""
    if not path or not os.path.exists(path):
        return {"fingerprint": fingerprint, "groups": {}, "options": {}, "table": {}}
    cached = read_json(path)
    clash = [g for g in groups if cached.get("groups", {}).get(g, groups[g]) != groups[g]]
    clash += [o for o in options if cached.get("options", {}).get(o, options[o]) != options[o]]
    if cached.get("fingerprint") != fingerprint or clash:
        raise ValueError(f"sensitivity cache {path} was made with other settings ("
                         f"{', '.join(clash) or 'prompts, seeds, scorer or pipeline call'}); pass another cache "
                         f"path or delete it to start over")
    return cached


def measure(pipe, groups: dict[str, list[str]], options: dict[str, dict], prompts: list[str], seeds: list[int],
            score, calibration=None, cache: str | os.PathLike | None = None, proxy: bool = True,
            **call) -> dict[str, dict[str, dict]]:
    """The sensitivity table `table[group][option] = {"cost": bits, "metrics": {metric: degradation},
    "proxy": {family: relative eps error}}`, the input of `allocation.allocate`.

    `groups`: `{group name: layer names}` (quantized-by-default roles only); `options`: `{label:
    ViDiTQConfig kwargs}`, e.g. `{"W4A8": {"preset": "w4a8"}, "W8A8": {"preset": "w8a8"}}`; `score(samples,
    reference) -> {metric: value}`, higher is better; `call`: the pipeline call (steps, guidance, size...).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cache = os.fspath(cache) if cache is not None else None
    fingerprint = {"prompts": prompts, "seeds": seeds, "score": getattr(score, "__qualname__", type(score).__name__),
                   "call": {k: repr(v) for k, v in sorted(call.items())}, "model": type(pipe.transformer).__name__}
    cached = _load_cache(cache, fingerprint, groups, options)
    cached["groups"].update(groups)
    cached["options"].update(options)
    table = cached["table"]
    all_layers = [name for layers in groups.values() for name in layers]
    reference = generate(pipe, prompts, seeds, **call)
    fp_scores = score(reference, reference)
    todo = [(g, o) for g in groups for o in options if o not in table.get(g, {})]
    mine = todo[state.process_index::state.num_processes]  # under accelerate launch: runs split between processes
    shard = cache if state.num_processes == 1 or cache is None else f"{cache}.rank{state.process_index}"
    for group, label in tqdm(mine, desc="viditq sensitivity", unit="run", disable=None):
        model = quantize_only(pipe.transformer, groups[group], all_layers, options[label], calibration)
        samples = generate(with_transformer(pipe, model), prompts, seeds, **call)
        scores = score(samples, reference)
        entry = {"cost": stored_bits(model.config.quantization_config.plan, groups[group]),
                 "metrics": {m: fp_scores[m] - scores[m] for m in scores}}
        if proxy:
            entry["proxy"] = proxy_errors(pipe, model, prompts, seeds, **call)
        table.setdefault(group, {})[label] = entry
        if shard:
            write_json(shard, cached)
    if state.num_processes > 1:  # every process gets every run's entry
        for group, label, entry in gather_object([(g, o, table[g][o]) for g, o in mine]):
            table.setdefault(group, {})[label] = entry
        if cache and state.is_main_process:
            write_json(cache, cached)
    return {g: {o: table[g][o] for o in options} for g in groups}


def rank_agreement(table: dict[str, dict[str, dict]], option: str) -> dict[str, float]:
    """Spearman rank correlation, across groups, between each metric family's proxy and the measured
    degradation of the family's metric, at `option`. Families the table lacks are left out."""
    from scipy.stats import spearmanr

    out = {}
    for family in (FIDELITY, TEXT, TEMPORAL):
        pairs = [(e["proxy"][family], e["metrics"][family]) for e in (t[option] for t in table.values())
                 if family in e.get("proxy", {}) and family in e["metrics"]]
        if len(pairs) >= 3:
            out[family] = float(spearmanr(*zip(*pairs)).statistic)
    return out
