"""Mixed-precision allocation: the integer program finds the brute-force optimum, respects the budget and the
tolerances, and says clearly when nothing fits."""

import itertools
import random

import pytest

from viditq_diffusers.mixed_precision.allocation import allocate, allocate_best


def table_of(seed, groups=7, timestep_wise=False):
    rng = random.Random(seed)
    table = {}
    for g in range(groups):
        n = rng.choice([1, 2, 4]) * 1000
        w4 = {"psnr_drop": rng.uniform(0.1, 3), "clip_drop": rng.uniform(0, 0.02)}
        options = {"W4A8": {"cost": 4 * n, "metrics": w4},
                   "W8A8": {"cost": 8 * n, "metrics": {m: v * rng.uniform(0.01, 0.2) for m, v in w4.items()}}}
        if timestep_wise:  # W8 for the first steps only: both copies stored
            options["W8A8|W4A8"] = {"cost": 12 * n, "metrics": {m: v * rng.uniform(0.2, 0.6) for m, v in w4.items()}}
        table[f"g{g}"] = options
    return table


def brute_force(table, budget, tolerances):
    groups = list(table)
    metrics = sorted({m for o in table.values() for v in o.values() for m in v["metrics"]})
    scale = {m: tolerances.get(m) or max(v["metrics"].get(m, 0) for o in table.values() for v in o.values())
             for m in metrics}
    best = None
    for combo in itertools.product(*(table[g] for g in groups)):
        picked = [table[g][o] for g, o in zip(groups, combo)]
        deg = {m: sum(p["metrics"].get(m, 0) for p in picked) for m in metrics}
        if sum(p["cost"] for p in picked) > budget or any(deg[m] > t for m, t in tolerances.items()):
            continue
        value = sum(deg[m] / scale[m] for m in metrics)
        best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("timestep_wise", [False, True])
def test_matches_brute_force_and_respects_budget_and_tolerances(seed, timestep_wise):
    table = table_of(seed, timestep_wise=timestep_wise)
    total = sum(v["W4A8"]["cost"] for v in table.values()) / 4
    budget = 5.5 * total
    worst = sum(v["W4A8"]["metrics"]["clip_drop"] for v in table.values())
    tolerances = {"clip_drop": 0.6 * worst}
    result = allocate(table, budget, tolerances)
    assert result.cost <= budget and result.degradation["clip_drop"] <= tolerances["clip_drop"] + 1e-12
    assert set(result.choice) == set(table)
    scale = {"clip_drop": tolerances["clip_drop"],
             "psnr_drop": max(v["metrics"]["psnr_drop"] for o in table.values() for v in o.values())}
    value = sum(result.degradation[m] / scale[m] for m in scale)
    assert value == pytest.approx(brute_force(table, budget, tolerances), rel=1e-9)


def test_one_w8_slot_goes_to_the_group_that_gains_most():
    gain = {"a": 1.0, "b": 5.0, "c": 2.0}
    table = {g: {"W4A8": {"cost": 4, "metrics": {"psnr_drop": d}}, "W8A8": {"cost": 8, "metrics": {"psnr_drop": 0.0}}}
             for g, d in gain.items()}
    assert allocate(table, budget=16).choice == {"a": "W4A8", "b": "W8A8", "c": "W4A8"}
    assert allocate(table, budget=24).choice == {"a": "W8A8", "b": "W8A8", "c": "W8A8"}


def test_infeasible_requests_are_refused_with_the_reason():
    table = table_of(0, groups=3)
    cheapest = sum(v["W4A8"]["cost"] for v in table.values())
    with pytest.raises(ValueError, match="below the cheapest plan"):
        allocate(table, cheapest - 1)
    with pytest.raises(ValueError, match="raise the budget or loosen the tolerances"):
        allocate(table, cheapest, {"psnr_drop": 1e-6})
    with pytest.raises(ValueError, match="does not have"):
        allocate(table, cheapest, {"fid": 1.0})


def all_plans(table, budget):
    """Every feasible plan's objective (metrics scaled by their largest degradation), best first."""
    groups = list(table)
    metrics = sorted({m for o in table.values() for v in o.values() for m in v["metrics"]})
    scale = {m: max(v["metrics"].get(m, 0) for o in table.values() for v in o.values()) for m in metrics}
    values = []
    for combo in itertools.product(*(table[g] for g in groups)):
        picked = [table[g][o] for g, o in zip(groups, combo)]
        if sum(p["cost"] for p in picked) <= budget:
            values.append(sum(sum(p["metrics"].get(m, 0) for p in picked) / scale[m] for m in metrics))
    return sorted(values)


@pytest.mark.parametrize("seed", range(3))
def test_k_best_are_the_brute_force_k_best_in_order_and_distinct(seed):
    table = table_of(seed, groups=6)
    total = sum(v["W4A8"]["cost"] for v in table.values()) / 4
    best = allocate_best(table, 5.5 * total, k=5)
    scale = {m: max(v["metrics"].get(m, 0) for o in table.values() for v in o.values()) for m in best[0].degradation}
    values = [sum(a.degradation[m] / scale[m] for m in scale) for a in best]
    assert values == pytest.approx(all_plans(table, 5.5 * total)[:5], rel=1e-9)
    assert len({tuple(sorted(a.choice.items())) for a in best}) == 5
    assert all(a.cost <= 5.5 * total for a in best)


def test_k_best_stops_when_no_other_plan_fits():
    table = table_of(0, groups=2)
    cheapest = sum(v["W4A8"]["cost"] for v in table.values())
    assert [a.choice for a in allocate_best(table, cheapest, k=3)] == [{g: "W4A8" for g in table}]
