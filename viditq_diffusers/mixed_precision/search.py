"""The mixed-precision search end to end: groups -> sensitivity table -> allocation -> a plan.

The plan is an ordinary per-layer plan (`plan.py`): each layer's entry is what the chosen option's preset
would have planned for it, so it saves, loads and quantizes like any other (`ViDiTQConfig(plan=...)`, with
the calibration statistics when an option balances channels).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import metrics
from ..config import ViDiTQConfig
from ..plan import average_weight_bits, build_plan
from .allocation import Allocation, allocate
from .roles import group_layers, quantized_by_default
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

    @property
    def average_bits(self) -> float:
        return average_weight_bits(self.plan)


def quantizable_groups(model, block_ranges=4) -> dict[str, list[str]]:
    return {g: names for g, names in group_layers(model, block_ranges).items() if quantized_by_default(group_role(g))}


def plan_from_choice(model, groups: dict[str, list[str]], options: dict[str, dict], choice: dict[str, str],
                     calibration=None) -> dict:
    """One plan: every group's layers planned as its chosen option's preset plans them."""
    per_option = {label: build_plan(model, ViDiTQConfig(**options[label], calibration=calibration))
                  for label in set(choice.values())}
    plan = next(iter(per_option.values()))
    plan["layers"] = {name: per_option[choice[group]]["layers"][name] for group in groups for name in groups[group]}
    return plan


def search(pipe, budget_bits: float, prompts: list[str], seeds: list[int], score=fidelity_scorer,
           options: dict[str, dict] | None = None, block_ranges=4, tolerances: dict[str, float] | None = None,
           calibration=None, cache=None, **call) -> SearchResult:
    """Measure every group at every option, then pick per group under `budget_bits` average weight bits."""
    options = dict(options or DEFAULT_OPTIONS)
    groups = quantizable_groups(pipe.transformer, block_ranges)
    table = measure(pipe, groups, options, prompts, seeds, score, calibration=calibration, cache=cache, **call)
    weights = sum(pipe.transformer.get_submodule(n).weight.numel() for names in groups.values() for n in names)
    allocation = allocate(table, budget_bits * weights, tolerances)
    plan = plan_from_choice(pipe.transformer, groups, options, allocation.choice, calibration)
    return SearchResult(plan, groups, table, allocation)
