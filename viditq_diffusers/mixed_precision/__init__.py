"""Metric-decoupled mixed precision (ViDiT-Q-MP; docs/mixed-precision.md): per-group sensitivity with a cheap proxy, the
budgeted allocation, the cost model (each option's measured time per layer, for a latency budget), the search that
ties them together, and a heatmap of the sensitivity table. The layer roles and role x block-range groups
(`viditq_diffusers.roles`) and the paper's reference heuristic (`w4a8_mp`,
`viditq_diffusers.reference_mixed_precision`) sit lower in the package, since plans use them; their names are
re-exported here."""

from ..reference_mixed_precision import reference_w8_layers
from ..roles import (
    FALLBACK_PATTERNS, FP_ROLES, ROLE_MAPS, Role, block_index, classify, group_layers, quantized_by_default,
)
from .allocation import Allocation, allocate, allocate_best
from .cost import CostTable, group_seconds
from .sensitivity import dominant_metric, measure, proxy_errors, rank_agreement

__all__ = [
    "Allocation", "allocate", "allocate_best", "CostTable", "group_seconds", "reference_w8_layers", "dominant_metric",
    "measure", "proxy_errors",
    "rank_agreement",
    "Role", "ROLE_MAPS", "FALLBACK_PATTERNS", "FP_ROLES", "classify", "block_index", "group_layers",
    "quantized_by_default",
]
