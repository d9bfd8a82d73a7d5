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


# -- the latency budget ------------------------------------------------------------------------------------------

def seconds_of(table, seed):
    """A cost model where W4A8 is sometimes faster, sometimes slower than W8A8 (group-wise kernels, rotations)."""
    rng = random.Random(seed + 100)
    return {g: {o: rng.uniform(0.5, 2.0) * (2 if o == "W8A8|W4A8" else 1) for o in options}
            for g, options in table.items()}


def brute_force_two_budgets(table, seconds, budget, max_seconds):
    """(best objective, least time among the plans with that objective) over every plan within both budgets."""
    groups = list(table)
    metrics = sorted({m for o in table.values() for v in o.values() for m in v["metrics"]})
    scale = {m: max(v["metrics"].get(m, 0) for o in table.values() for v in o.values()) for m in metrics}
    found = []
    for combo in itertools.product(*(table[g] for g in groups)):
        picked = [table[g][o] for g, o in zip(groups, combo)]
        time = sum(seconds[g][o] for g, o in zip(groups, combo))
        if sum(p["cost"] for p in picked) <= budget and time <= max_seconds:
            found.append((sum(sum(p["metrics"].get(m, 0) for p in picked) / scale[m] for m in metrics), time))
    return min(found) if found else None


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("timestep_wise", [False, True])
def test_two_budgets_match_brute_force(seed, timestep_wise):
    table = table_of(seed, timestep_wise=timestep_wise)
    seconds = seconds_of(table, seed)
    budget = 5.5 * sum(v["W4A8"]["cost"] for v in table.values()) / 4
    all_w8 = sum(s["W8A8"] for s in seconds.values())
    for max_seconds in (0.8 * all_w8, all_w8, 1.2 * all_w8):
        expected = brute_force_two_budgets(table, seconds, budget, max_seconds)
        if expected is None:
            with pytest.raises(ValueError, match="no plan fits both budgets"):
                allocate(table, budget, seconds=seconds, max_seconds=max_seconds)
            continue
        result = allocate(table, budget, seconds=seconds, max_seconds=max_seconds)
        assert result.cost <= budget and result.seconds <= max_seconds + 1e-12
        assert result.seconds == pytest.approx(sum(seconds[g][o] for g, o in result.choice.items()))
        scale = {m: max(v["metrics"].get(m, 0) for o in table.values() for v in o.values()) for m in result.degradation}
        value = sum(result.degradation[m] / scale[m] for m in scale)
        assert (value, result.seconds) == pytest.approx(expected, rel=1e-9)


def w4_w8_table():
    """Two groups: W4A8 costs quality, W8A8 bits; group b's W4A8 is the slow one (a group-wise kernel, say)."""
    table = {g: {"W4A8": {"cost": 4, "metrics": {"err": d}}, "W8A8": {"cost": 8, "metrics": {"err": 0.0}}}
             for g, d in {"a": 1.0, "b": 2.0}.items()}
    seconds = {"a": {"W4A8": 1.0, "W8A8": 2.0}, "b": {"W4A8": 5.0, "W8A8": 2.0}}
    return table, seconds


def test_the_latency_budget_moves_w8_to_where_w4_is_slow():
    table, seconds = w4_w8_table()
    assert allocate(table, 12).choice == {"a": "W4A8", "b": "W8A8"}  # bits alone: protect b, the worse at W4
    # 1.0 x all-W8A8 (4 s): b at W4 would take 5 s alone, so b stays W8 and a may go W4 (3 s)
    result = allocate(table, 12, seconds=seconds, max_seconds=4.0)
    assert result.choice == {"a": "W4A8", "b": "W8A8"} and result.seconds == 3.0
    assert allocate(table, 16, seconds=seconds, max_seconds=3.0).choice == {"a": "W4A8", "b": "W8A8"}
    # a latency budget exactly at a plan's time admits it (<=, not <)
    assert allocate(table, 8, seconds=seconds, max_seconds=6.0).choice == {"a": "W4A8", "b": "W4A8"}


def test_infeasible_budgets_name_the_fastest_and_the_smallest_plan():
    table, seconds = w4_w8_table()
    # 8 bits force W4 everywhere (6 s); 4 s is too fast for that, and the smallest plan within 4 s needs 12 bits
    with pytest.raises(ValueError, match=r"fastest plan within 8 bits takes 6 s; the smallest plan within 4 s "
                                         r"needs 12 bits"):
        allocate(table, 8, seconds=seconds, max_seconds=4.0)
    with pytest.raises(ValueError, match="the fastest plan within 16 bits takes 3 s; no plan fits the latency"):
        allocate(table, 16, seconds=seconds, max_seconds=2.5)
    with pytest.raises(ValueError, match="needs seconds"):
        allocate(table, 16, max_seconds=2.5)
    with pytest.raises(ValueError, match=r"no time for \['b/W8A8'\]"):
        allocate(table, 16, seconds={"a": seconds["a"], "b": {"W4A8": 1.0}}, max_seconds=9.0)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        allocate(table, 16, seconds={"a": seconds["a"], "b": {"W4A8": 1.0, "W8A8": float("nan")}})


def test_a_tie_in_quality_goes_to_the_faster_plan():
    # both options are equally good for every group: only the time tells them apart, whichever is listed first
    for slow in ("W4A8", "W8A8"):
        table = {g: {"W4A8": {"cost": 4, "metrics": {"err": 0.5}}, "W8A8": {"cost": 8, "metrics": {"err": 0.5}}}
                 for g in "abc"}
        seconds = {g: {o: 3.0 if o == slow else 1.0 for o in ("W4A8", "W8A8")} for g in "abc"}
        result = allocate(table, 24, seconds=seconds)
        assert set(result.choice.values()) == {"W8A8" if slow == "W4A8" else "W4A8"} and result.seconds == 3.0
    # k best with a latency budget: every plan listed fits it, in order of quality
    table, seconds = w4_w8_table()
    found = allocate_best(table, 16, k=4, seconds=seconds, max_seconds=4.0)
    assert [a.choice for a in found] == [{"a": "W8A8", "b": "W8A8"}, {"a": "W4A8", "b": "W8A8"}]


def test_infeasible_budgets_are_said_in_multiples_of_w8a8_and_average_bits_when_the_units_are_given():
    table, seconds = w4_w8_table()
    with pytest.raises(ValueError, match=r"takes 6 s \(1\.500x W8A8\); the smallest plan within 4 s \(1\.000x W8A8\) "
                                         r"needs 12 bits \(6\.000 average bits\)"):
        allocate(table, 8, seconds=seconds, max_seconds=4.0, units=(4.0, 2))
