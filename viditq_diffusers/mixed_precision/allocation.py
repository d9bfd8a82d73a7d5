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

`scale_m` puts the metrics on one footing: the tolerance when one is given, else the metric's largest
degradation. An infeasible budget or tolerance raises an error that says what the cheapest plan needs.

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


def _metrics(table: dict) -> list[str]:
    return sorted({m for options in table.values() for option in options.values() for m in option["metrics"]})


def metric_scales(table: dict[str, dict[str, dict]], tolerances: dict[str, float] | None = None) -> dict[str, float]:
    """What one unit of each metric's degradation is worth in the objective: its tolerance when one is given,
    else its largest degradation in the table."""
    tolerances = tolerances or {}
    return {m: tolerances.get(m) or max(max(abs(o["metrics"].get(m, 0.0)) for options in table.values()
                                            for o in options.values()), 1e-12) for m in _metrics(table)}


def allocate(table: dict[str, dict[str, dict]], budget: float, tolerances: dict[str, float] | None = None,
             exclude: list[dict[str, str]] = ()) -> Allocation:
    """The best option per group (see module docstring).

    `table[group][option] = {"cost": bits, "metrics": {metric: degradation}}`; `budget`: total bits;
    `tolerances`: optional `{metric: largest allowed summed degradation}`; `exclude`: choices (group ->
    option) the answer must differ from.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    tolerances = dict(tolerances or {})
    metrics = _metrics(table)
    unknown = set(tolerances) - set(metrics)
    if unknown:
        raise ValueError(f"tolerances name metrics the table does not have: {sorted(unknown)} (table: {metrics})")
    keys = [(g, o) for g, options in table.items() for o in options]
    if not keys:
        raise ValueError("the sensitivity table is empty: nothing to allocate")
    cost = np.array([table[g][o]["cost"] for g, o in keys], dtype=float)
    deg = np.array([[table[g][o]["metrics"].get(m, 0.0) for m in metrics] for g, o in keys], dtype=float)
    cheapest = sum(min(o["cost"] for o in options.values()) for options in table.values())
    if cheapest > budget:
        raise ValueError(f"budget {budget:.4g} bits is below the cheapest plan ({cheapest:.4g} bits: every group at "
                         f"its cheapest option); raise the budget")
    scales = metric_scales(table, tolerances)
    scale = np.array([scales[m] for m in metrics])
    objective = (deg / scale).sum(axis=1)

    one_each = np.array([[1.0 if g == group else 0.0 for g, _ in keys] for group in table])
    rows, lo, hi = [one_each, cost[None, :]], [np.ones(len(table)), [-np.inf]], [np.ones(len(table)), [budget]]
    for i, m in enumerate(metrics):
        if m in tolerances:
            rows.append(deg[None, :, i])
            lo.append([-np.inf])
            hi.append([tolerances[m]])
    for other in exclude:
        rows.append(np.array([[1.0 if other.get(g) == o else 0.0 for g, o in keys]]))
        lo.append([-np.inf])
        hi.append([len(table) - 1])
    result = milp(objective, integrality=np.ones(len(keys)), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi)))
    if result.status != 0 or result.x is None:
        if exclude:
            raise ValueError(f"no plan other than the {len(exclude)} excluded fits budget {budget:.4g} bits "
                             f"within tolerances {tolerances}")
        best = {m: sum(min(o["metrics"].get(m, 0.0) for o in options.values()) for options in table.values())
                for m in tolerances}
        raise ValueError(f"no plan fits budget {budget:.4g} bits within tolerances {tolerances}: {result.message}. "
                         f"Even ignoring the budget the smallest summed degradations are {best}; "
                         f"raise the budget or loosen the tolerances")
    picked = [keys[i] for i in np.flatnonzero(result.x > 0.5)]
    chosen = np.array([k in picked for k in keys])
    return Allocation(choice=dict(picked), cost=float(cost[chosen].sum()),
                      degradation={m: float(deg[chosen, i].sum()) for i, m in enumerate(metrics)})


def allocate_best(table: dict[str, dict[str, dict]], budget: float, k: int,
                  tolerances: dict[str, float] | None = None) -> list[Allocation]:
    """The `k` best allocations in order (fewer when fewer plans fit): `allocate` re-solved with every earlier
    answer excluded."""
    found = [allocate(table, budget, tolerances)]
    while len(found) < k:
        try:
            found.append(allocate(table, budget, tolerances, exclude=[a.choice for a in found]))
        except ValueError:
            break  # every plan that fits is already listed
    return found
