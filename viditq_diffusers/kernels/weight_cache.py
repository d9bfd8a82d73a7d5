"""A kernel's own layout of a quantized weight, built on first use and kept while the weight lives.

Keyed by the weight tensor's identity and rebuilt when its codes or zero points are modified in place
(`load_state_dict` into an existing layer, a LoRA merge), using torch's version counters.
"""

from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
_entries: dict[tuple[str, int], tuple] = {}  # (kind, id(qweight)) -> (weakref, version, value)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def packed(kind: str, qweight: torch.Tensor, zero: torch.Tensor | None, build: Callable[[], T]) -> T:
    """`build()`'s result for this `kind` of layout of `qweight` (with zero points `zero`), cached."""
    key = (kind, id(qweight))
    version = (_version(qweight), None if zero is None else (id(zero), _version(zero)))
    hit = _entries.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == version:
        return hit[2]
    value = build()
    _entries[key] = (weakref.ref(qweight, lambda _, key=key: _entries.pop(key, None)), version, value)
    return value
