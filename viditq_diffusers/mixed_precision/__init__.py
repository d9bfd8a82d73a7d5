"""Metric-decoupled mixed precision (docs/mixed-precision.md). So far: layer roles and role x block-range groups,
the paper's reference heuristic (`w4a8_mp`), per-group sensitivity with a cheap proxy, and the budgeted
allocation."""

from .allocation import Allocation, allocate, allocate_best
from .heuristic import reference_w8_layers
from .sensitivity import dominant_metric, measure, proxy_errors, rank_agreement
from .roles import (
    FALLBACK_PATTERNS, FP_ROLES, ROLE_MAPS, Role, block_index, classify, group_layers, quantized_by_default,
)

__all__ = [
    "Allocation", "allocate", "allocate_best", "reference_w8_layers", "dominant_metric", "measure", "proxy_errors",
    "rank_agreement",
    "Role", "ROLE_MAPS", "FALLBACK_PATTERNS", "FP_ROLES", "classify", "block_index", "group_layers",
    "quantized_by_default",
]
