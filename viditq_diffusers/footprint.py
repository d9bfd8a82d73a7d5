"""Weight memory accounting: what a model holds, and what it would hold in FP16."""

from __future__ import annotations

from torch import nn

from .nn import ViDiTQLinear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, as stored (int codes, fp32 scales, FP layers)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def fp16_weight_bytes(model: nn.Module) -> int:
    """Bytes the same model takes with every floating weight in FP16 (quantized layers included)."""
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if isinstance(module, ViDiTQLinear):
            total += (module.in_features * module.out_features * 2
                      + (module.out_features * 2 if module.bias is not None else 0))
            continue
        total += sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)
    return total
