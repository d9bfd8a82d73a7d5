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


def allocate(table: dict[str, dict[str, dict]], budget: float, tolerances: dict[str, float] | None = None
             ) -> Allocation:
    """The best option per group (see module docstring).

    `table[group][option] = {"cost": bits, "metrics": {metric: degradation}}`; `budget`: total bits;
    `tolerances`: optional `{metric: largest allowed summed degradation}`.
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
    scale = np.array([tolerances.get(m) or max(float(np.abs(deg[:, i]).max()), 1e-12) for i, m in enumerate(metrics)])
    objective = (deg / scale).sum(axis=1)

    one_each = np.array([[1.0 if g == group else 0.0 for g, _ in keys] for group in table])
    rows, lo, hi = [one_each, cost[None, :]], [np.ones(len(table)), [-np.inf]], [np.ones(len(table)), [budget]]
    for i, m in enumerate(metrics):
        if m in tolerances:
            rows.append(deg[None, :, i])
            lo.append([-np.inf])
            hi.append([tolerances[m]])
    result = milp(objective, integrality=np.ones(len(keys)), bounds=Bounds(0, 1),
                  constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi)))
    if result.status != 0 or result.x is None:
        best = {m: sum(min(o["metrics"].get(m, 0.0) for o in options.values()) for options in table.values())
                for m in tolerances}
        raise ValueError(f"no plan fits budget {budget:.4g} bits within tolerances {tolerances}: {result.message}. "
                         f"Even ignoring the budget the smallest summed degradations are {best}; "
                         f"raise the budget or loosen the tolerances")
    picked = [keys[i] for i in np.flatnonzero(result.x > 0.5)]
    chosen = np.array([k in picked for k in keys])
    return Allocation(choice=dict(picked), cost=float(cost[chosen].sum()),
                      degradation={m: float(deg[chosen, i].sum()) for i, m in enumerate(metrics)})
