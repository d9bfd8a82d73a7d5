"""The mixed-precision search end to end: groups -> sensitivity table -> allocation -> confirmation -> a plan.

The allocation adds up the degradations each group caused alone, a first-order model: errors of groups
quantized together compound, and a table measured on a few prompts is noisy, so its few best plans are near
ties it cannot order. So the search can confirm with the task metrics (docs/mixed-precision.md): with
`candidates=N` the N best allocations are each generated whole on the search prompts and scored, and the plan
that measures best (metrics weighted as in the allocation) wins. It is off by default: on the stressed
reference image pipeline the best plans' measured differences were sample noise, and the pick did not carry
over to other prompts (benchmarks/archive/RESULTS-2026-11.md, "Mixed precision"); it guards against a table
whose sum misleads.

With `max_latency` the plan must also be fast: the cost model (`cost.py`) times every group at every option on
this machine, and the allocation keeps the summed time within `max_latency` times the all-W8A8 time of the
same layers (1.0: no slower than W8A8). The times are measured before the sensitivity runs (a shape map that
does not fit fails at once) and kept in `costs` (a path: reused when it exists, saved after).

The plan is an ordinary per-layer plan (`plan.py`): each layer's entry is what the chosen option's preset
would have planned for it, so it saves, loads and quantizes like any other (`ViDiTQConfig(plan=...)`, with
the calibration statistics when an option balances channels).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..checks import GENERATOR_SEEDS, boolean, integer, real, shown
from ..config import ViDiTQConfig
from ..api import quantize
from ..evaluation import generate, with_transformer
from ..plan import average_weight_bits, build_plan
from .allocation import Allocation, allocate_best, metric_scales
from .cost import CostTable, group_seconds, seconds_limit
from ..roles import group_layers, quantized_by_default
from .sensitivity import FIDELITY, group_role, measure

DEFAULT_OPTIONS = {"W4A8": {"preset": "w4a8"}, "W8A8": {"preset": "w8a8"}}


def fidelity_scorer(samples, reference) -> dict[str, float]:
    """The scorer that needs no model (pass your own for text alignment etc.): visual fidelity as minus the
    relative squared error vs FP. Squared errors of independently quantized groups add up, so the summed
    degradations the allocation minimises track the whole plan's error; PSNR drops do not add."""
    return {FIDELITY: -metrics.relative_mse(samples, reference)}


@dataclass
class SearchResult:
    plan: dict
    groups: dict[str, list[str]]
    table: dict
    allocation: Allocation
    confirmed: list[dict] = field(default_factory=list)  # per candidate: predicted and measured degradations
    seconds: dict | None = None  # the cost model: {group: {option: seconds}}, when one was measured
    w8a8_seconds: float | None = None  # the same layers, all at W8A8: the latency budget's unit

    @property
    def average_bits(self) -> float:
        return average_weight_bits(self.plan)

    @property
    def latency(self) -> float | None:
        """The plan's predicted time as a multiple of all-W8A8 (None without a cost model)."""
        return None if self.seconds is None else self.allocation.seconds / self.w8a8_seconds


def quantizable_groups(model, block_ranges=4, per_layer: bool = False) -> dict[str, list[str]]:
    """The quantized-by-default groups of `roles.group_layers`; with `per_layer`, every layer a group of its
    own, named after its group and itself (`"self_attn[2-2]:transformer_blocks.2.attn1.to_q"`)."""
    groups = {g: names for g, names in group_layers(model, block_ranges).items() if quantized_by_default(group_role(g))}
    if per_layer:
        groups = {f"{g}:{name}": [name] for g, names in groups.items() for name in names}
    return groups


def plan_from_choice(model, groups: dict[str, list[str]], options: dict[str, dict], choice: dict[str, str],
                     calibration=None) -> dict:
    """One plan: every group's layers planned as its chosen option's preset plans them."""
    per_option = {label: build_plan(model, ViDiTQConfig(**options[label], calibration=calibration))
                  for label in set(choice.values())}
    plan = next(iter(per_option.values()))
    plan["layers"] = {name: per_option[choice[group]]["layers"][name] for group in groups for name in groups[group]}
    return plan


@torch.no_grad()
def confirm(pipe, groups: dict[str, list[str]], options: dict[str, dict], table: dict, candidates: list[Allocation],
            prompts: list[str], seeds: list[int], score, tolerances: dict[str, float] | None = None,
            calibration=None, **call) -> tuple[int, list[dict]]:
    """Generate each candidate plan whole on the prompts and score it. Returns the index of the one that
    measures best (summed degradations weighted by `metric_scales`; candidates outside a tolerance lose to
    any inside) and per candidate `{"predicted", "measured"}` degradations and whether it was `"chosen"`."""
    reference = generate(pipe, prompts, seeds, **call)
    fp_scores = score(reference, reference)
    scales, tolerances = metric_scales(table, tolerances), tolerances or {}
    report = []
    for candidate in tqdm(candidates, desc="viditq confirm", unit="plan", disable=None):
        plan = plan_from_choice(pipe.transformer, groups, options, candidate.choice, calibration)
        model = quantize(copy.deepcopy(pipe.transformer), ViDiTQConfig(plan=plan, calibration=calibration))
        scores = score(generate(with_transformer(pipe, model), prompts, seeds, **call), reference)
        report.append({"predicted": candidate.degradation, "measured": {m: fp_scores[m] - scores[m] for m in scores},
                       "chosen": False})

    def rank(i):
        measured = report[i]["measured"]
        outside = any(measured.get(m, 0.0) > t for m, t in tolerances.items())
        return outside, sum(measured.get(m, 0.0) / s for m, s in scales.items())

    best = min(range(len(candidates)), key=rank)
    report[best]["chosen"] = True
    if rank(best)[0]:
        warnings.warn(f"every candidate plan measures outside the tolerances {tolerances} on the search prompts "
                      f"(best: {report[best]['measured']}); raise the budget or loosen the tolerances")
    return best, report


def check_search_arguments(budget_bits, prompts, seeds, options, tolerances, candidates, per_layer, max_latency=None,
                           costs=None, cost_tokens=None) -> None:
    """`search`'s arguments, before any model runs: each error names the argument, the value and the fix."""
    real(budget_bits, "search: budget_bits", minimum=1e-9, maximum=64,
         fix="pass the average stored weight bits the plan may use, e.g. budget_bits=6.0 (4-bit W4A8 layers "
             "store about 4, W8A8 ones about 8)")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"search: prompts must be a non-empty list of prompt strings, got {shown(prompts)}.")
    if not isinstance(seeds, (list, tuple)) or len(seeds) != len(prompts):
        raise ValueError(f"search: seeds must be a list of one integer per prompt ({len(prompts)}), got "
                         f"{shown(seeds)}.")
    for i, seed in enumerate(seeds):
        integer(seed, f"search: seeds[{i}]", minimum=GENERATOR_SEEDS[0], maximum=GENERATOR_SEEDS[1])
    if options is not None and (not isinstance(options, dict) or not options
                                or not all(isinstance(o, dict) for o in options.values())):
        raise TypeError(f"search: options must be a non-empty {{label: ViDiTQConfig keyword arguments}} dict, e.g. "
                        f"{DEFAULT_OPTIONS}, got {shown(options)}.")
    for label, option in (options or {}).items():
        if "plan" in option or "calibration" in option:
            raise ValueError(f"search: option {label!r} sets {'plan' if 'plan' in option else 'calibration'}; an "
                             f"option is a preset and its overrides (the search builds the plan, and takes the "
                             f"statistics as its own calibration argument).")
    if tolerances is not None:
        if not isinstance(tolerances, dict):
            raise TypeError(f"search: tolerances must be a {{metric: largest allowed degradation}} dict or None, "
                            f"got {shown(tolerances)}.")
        for metric, tolerance in tolerances.items():
            real(tolerance, f"search: tolerances[{metric!r}]", minimum=0)
    integer(candidates, "search: candidates", minimum=1, fix="1 keeps the allocation's best plan; N > 1 measures "
                                                             "the N best whole")
    boolean(per_layer, "search: per_layer")
    if max_latency is not None:
        real(max_latency, "search: max_latency", minimum=1e-6,
             fix="pass the plan's largest allowed time as a multiple of every quantized layer at W8A8, e.g. "
                 "max_latency=1.0 (no slower than W8A8), or None for no latency budget")
    if costs is not None and not isinstance(costs, (str, os.PathLike, CostTable)):
        raise TypeError(f"search: costs must be a cost table's path (JSON; measured and saved there when it does not "
                        f"exist), a cost.CostTable or None, got {shown(costs)}.")
    if cost_tokens is not None:
        integer(cost_tokens, "search: cost_tokens", minimum=1,
                fix="the rows (tokens x batch) a layer is timed with, or None for the rows each layer sees in the "
                    "search's pipeline call")


def cost_table(costs, device) -> CostTable:
    """The `costs` argument as a table: the saved one when its path exists, else an empty one to measure into."""
    if isinstance(costs, CostTable):
        return costs
    if costs is not None and os.path.exists(costs):
        return CostTable.load(costs, device)
    return CostTable(device)


def search(pipe, budget_bits: float, prompts: list[str], seeds: list[int], score=fidelity_scorer,
           options: dict[str, dict] | None = None, block_ranges=4, tolerances: dict[str, float] | None = None,
           calibration=None, cache=None, candidates: int = 1, per_layer: bool = False, max_latency: float | None = None,
           costs=None, cost_tokens: int | None = None, cost_shapes: dict | None = None, **call) -> SearchResult:
    """Measure every group (every layer, with `per_layer`) at every option, allocate the `candidates` best plans
    under `budget_bits` average weight bits (and `max_latency` times all-W8A8's time, when given) and, when there
    are several, keep the one that measures best whole (`confirm`).

    The cost model (`cost.py`) runs when `max_latency` or `costs` is given: `costs` is a cost table's path (reused
    when it exists, saved after measuring) or a `CostTable`; the layers are timed with `cost_tokens` rows, or the
    rows each sees in the search's pipeline call, or at the shapes of `cost_shapes` (`{layer: (K, N, M)}`, e.g. a
    big model's layers the plan will be mapped to)."""
    check_search_arguments(budget_bits, prompts, seeds, options, tolerances, candidates, per_layer, max_latency,
                           costs, cost_tokens)
    options = dict(options or DEFAULT_OPTIONS)
    groups = quantizable_groups(pipe.transformer, block_ranges, per_layer)
    seconds = w8a8 = None
    if max_latency is not None or costs is not None:
        timing = cost_table(costs, pipe.transformer.device)
        seconds, w8a8 = group_seconds(pipe, groups, options, timing, prompts, seeds, calibration, cost_tokens,
                                      cost_shapes, **call)
        if costs is not None and not isinstance(costs, CostTable):
            timing.save(costs)
    table = measure(pipe, groups, options, prompts, seeds, score, calibration=calibration, cache=cache, **call)
    weights = sum(pipe.transformer.get_submodule(n).weight.numel() for names in groups.values() for n in names)
    max_seconds = None if max_latency is None else seconds_limit(max_latency, w8a8)
    found = allocate_best(table, budget_bits * weights, candidates, tolerances, seconds, max_seconds,
                          None if w8a8 is None else (w8a8, weights))
    best, report = 0, []
    if len(found) > 1:
        best, report = confirm(pipe, groups, options, table, found, prompts, seeds, score, tolerances, calibration,
                               **call)
        for entry, candidate in zip(report, found):
            entry["seconds"] = candidate.seconds
    plan = plan_from_choice(pipe.transformer, groups, options, found[best].choice, calibration)
    return SearchResult(plan, groups, table, found[best], report, seconds, w8a8)
