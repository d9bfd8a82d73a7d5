"""Allocation: choose one precision option per layer group under a memory budget, metric by metric.

The input is a sensitivity table: for every group, its options (e.g. "W4A8", "W8A8", or a timestep-wise
"W4A8|W8A8") with their weight memory in bits and the degradation they cause on each metric when that group
alone is quantized that way (relative squared error, text-alignment drop, FD rise, ...). Degradations are
taken as additive across groups, the usual first-order assumption of mixed-precision search (it holds for
squared errors, not for dB).

The choice is an exact small integer program (scipy's `milp`, HiGHS branch and bound), not a heuristic:

    minimise   sum_m  sum_g d[g, o, m] x[g, o] / scale_m
    subject to sum_o x[g, o] = 1                       (one option per group)
               sum_g cost[g, o] x[g, o] <= budget      (memory)
               sum_g d[g, o, m] x[g, o] <= tol_m       (every metric within its tolerance of FP)
               sum_g t[g, o] x[g, o] <= max_seconds     (latency, when a cost model `t` is given)

`scale_m` puts the metrics on one footing: the tolerance when one is given, else the metric's largest
degradation. An infeasible budget or tolerance raises an error that says what the cheapest plan needs.

The latency row is the speed budget (`cost.py` measures `t[g, o]`: the seconds the group's layers take at that
option on this machine; the time of a plan is the sum, the layers running one after another). Among plans with
the same objective the faster one wins: with a cost model the program is solved twice, lexicographically (the
best objective first, then the least time among the plans within 1e-9 of it), so a tie between a fast and a slow
option never goes to the slow one by chance. An infeasible pair of budgets raises an error that names the
fastest plan within the bit budget and the smallest plan within the latency budget.

`allocate_best` gives the k best plans in order (each earlier answer cut off by one more constraint,
`sum over its picks of x <= groups - 1`), the candidates that the search then confirms end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    choice: dict[str, str]  # group -> option
    cost: float  # bits
    degradation: dict[str, float]  # metric -> summed degradation
    seconds: float | None = None  # the cost model's time of the plan (None without one)


def _metrics(table: dict) -> list[str]:
    return sorted({m for options in table.values() for option in options.values() for m in option["metrics"]})


def metric_scales(table: dict[str, dict[str, dict]], tolerances: dict[str, float] | None = None) -> dict[str, float]:
    """What one unit of each metric's degradation is worth in the objective: its tolerance when one is given,
    else its largest degradation in the table."""
    tolerances = tolerances or {}
    return {m: tolerances.get(m) or max(max(abs(o["metrics"].get(m, 0.0)) for options in table.values()
                                            for o in options.values()), 1e-12) for m in _metrics(table)}


def _solve(objective: np.ndarray, rows: list, lo: list, hi: list):
    """The 0/1 vector that minimises `objective` under the rows (HiGHS), or None when none fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    result = milp(objective, integrality=np.ones(len(objective)), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi)))
    return None if result.status != 0 or result.x is None else result.x > 0.5


def check_seconds(table: dict, seconds: dict) -> None:
    """`seconds[group][option]` must give a finite time >= 0 for every option of every group of the table."""
    missing = [f"{g}/{o}" for g, options in table.items() for o in options
               if not isinstance(seconds.get(g), dict) or o not in seconds[g]]
    if missing:
        raise ValueError(f"the cost model has no time for {missing[:5]}{' ...' if len(missing) > 5 else ''}; measure "
                         f"every group at every option (cost.group_seconds)")
    bad = {f"{g}/{o}": seconds[g][o] for g, options in table.items() for o in options
           if not isinstance(seconds[g][o], (int, float)) or not np.isfinite(seconds[g][o]) or seconds[g][o] < 0}
    if bad:
        raise ValueError(f"the cost model's times must be finite numbers >= 0, got {bad}")


def allocate(table: dict[str, dict[str, dict]], budget: float, tolerances: dict[str, float] | None = None,
             exclude: list[dict[str, str]] = (), seconds: dict[str, dict[str, float]] | None = None,
             max_seconds: float | None = None, units: tuple[float, float] | None = None) -> Allocation:
    """The best option per group (see module docstring).

    `table[group][option] = {"cost": bits, "metrics": {metric: degradation}}`; `budget`: total bits;
    `tolerances`: optional `{metric: largest allowed summed degradation}`; `exclude`: choices (group ->
    option) the answer must differ from; `seconds[group][option]`: the cost model's time (ties go to the faster
    plan); `max_seconds`: the latency budget, the largest allowed summed time (needs `seconds`); `units`: (the
    seconds of all-W8A8, the weights) to say an infeasible budget also in multiples of W8A8 and average bits.
    """
    tolerances = dict(tolerances or {})
    metrics = _metrics(table)
    unknown = set(tolerances) - set(metrics)
    if unknown:
        raise ValueError(f"tolerances name metrics the table does not have: {sorted(unknown)} (table: {metrics})")
    keys = [(g, o) for g, options in table.items() for o in options]
    if not keys:
        raise ValueError("the sensitivity table is empty: nothing to allocate")
    if max_seconds is not None and seconds is None:
        raise ValueError(f"max_seconds={max_seconds} needs seconds (the cost model's time per group and option); "
                         f"measure them with cost.group_seconds, or drop max_seconds")
    if seconds is not None:
        check_seconds(table, seconds)
    cost = np.array([table[g][o]["cost"] for g, o in keys], dtype=float)
    time = None if seconds is None else np.array([seconds[g][o] for g, o in keys], dtype=float)
    deg = np.array([[table[g][o]["metrics"].get(m, 0.0) for m in metrics] for g, o in keys], dtype=float)
    cheapest = sum(min(o["cost"] for o in options.values()) for options in table.values())
    if cheapest > budget:
        raise ValueError(f"budget {budget:.4g} bits is below the cheapest plan ({cheapest:.4g} bits: every group at "
                         f"its cheapest option); raise the budget")
    scales = metric_scales(table, tolerances)
    scale = np.array([scales[m] for m in metrics])
    objective = (deg / scale).sum(axis=1)

    one_each = np.array([[1.0 if g == group else 0.0 for g, _ in keys] for group in table])
    rows, lo, hi = [one_each], [np.ones(len(table))], [np.ones(len(table))]
    for i, m in enumerate(metrics):
        if m in tolerances:
            rows.append(deg[None, :, i])
            lo.append([-np.inf])
            hi.append([tolerances[m]])
    for other in exclude:
        rows.append(np.array([[1.0 if other.get(g) == o else 0.0 for g, o in keys]]))
        lo.append([-np.inf])
        hi.append([len(table) - 1])
    budget_rows = ([cost[None, :]], [[-np.inf]], [[budget]])
    latency_rows = ([], [], []) if max_seconds is None else ([time[None, :]], [[-np.inf]], [[max_seconds]])
    both = (rows + budget_rows[0] + latency_rows[0], lo + budget_rows[1] + latency_rows[1],
            hi + budget_rows[2] + latency_rows[2])
    chosen = _solve(objective, *both)
    if chosen is None:
        if exclude:
            raise ValueError(f"no plan other than the {len(exclude)} excluded fits budget {budget:.4g} bits"
                             + (f" and {max_seconds:.4g} s" if max_seconds is not None else "")
                             + f" within tolerances {tolerances}")
        if max_seconds is not None:
            raise ValueError(_latency_infeasible(cost, time, rows, lo, hi, budget, max_seconds, budget_rows,
                                                 latency_rows, units))
        best = {m: sum(min(o["metrics"].get(m, 0.0) for o in options.values()) for options in table.values())
                for m in tolerances}
        raise ValueError(f"no plan fits budget {budget:.4g} bits within tolerances {tolerances}. "
                         f"Even ignoring the budget the smallest summed degradations are {best}; "
                         f"raise the budget or loosen the tolerances")
    if time is not None:  # of the plans as good as this one, the fastest
        best = float(objective[chosen].sum())
        tie = (both[0] + [objective[None, :]], both[1] + [[-np.inf]],
               both[2] + [[best + 1e-9 * max(abs(best), 1.0)]])
        faster = _solve(time, *tie)
        chosen = chosen if faster is None else faster
    picked = [keys[i] for i in np.flatnonzero(chosen)]
    return Allocation(choice=dict(picked), cost=float(cost[chosen].sum()),
                      degradation={m: float(deg[chosen, i].sum()) for i, m in enumerate(metrics)},
                      seconds=None if time is None else float(time[chosen].sum()))


def _latency_infeasible(cost, time, rows, lo, hi, budget, max_seconds, budget_rows, latency_rows, units) -> str:
    """Why no plan fits both budgets: the fastest plan within the bits (and tolerances), the smallest plan within
    the latency, each solved exactly."""
    def secs(value):
        return f"{value:.4g} s" + (f" ({value / units[0]:.3f}x W8A8)" if units else "")

    def bits(value):
        return f"{value:.4g} bits" + (f" ({value / units[1]:.3f} average bits)" if units else "")

    fastest = _solve(time, rows + budget_rows[0], lo + budget_rows[1], hi + budget_rows[2])
    smallest = _solve(cost, rows + latency_rows[0], lo + latency_rows[1], hi + latency_rows[2])
    fast = ("no plan fits the bit budget within the tolerances" if fastest is None else
            f"the fastest plan within {bits(budget)} takes {secs(time[fastest].sum())}")
    small = ("no plan fits the latency budget within the tolerances" if smallest is None else
             f"the smallest plan within {secs(max_seconds)} needs {bits(cost[smallest].sum())}")
    return (f"no plan fits both budgets, {bits(budget)} and {secs(max_seconds)}: {fast}; {small}. Raise the "
            f"latency budget to at least the first or the bit budget to at least the second (or loosen the "
            f"tolerances)")


def allocate_best(table: dict[str, dict[str, dict]], budget: float, k: int,
                  tolerances: dict[str, float] | None = None, seconds: dict[str, dict[str, float]] | None = None,
                  max_seconds: float | None = None, units: tuple[float, float] | None = None) -> list[Allocation]:
    """The `k` best allocations in order (fewer when fewer plans fit): `allocate` re-solved with every earlier
    answer excluded."""
    found = [allocate(table, budget, tolerances, seconds=seconds, max_seconds=max_seconds, units=units)]
    while len(found) < k:
        try:
            found.append(allocate(table, budget, tolerances, exclude=[a.choice for a in found], seconds=seconds,
                                  max_seconds=max_seconds))
        except ValueError:
            break  # every plan that fits is already listed
    return found
