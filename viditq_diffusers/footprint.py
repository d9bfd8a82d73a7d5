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


def num_parameters(model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """diffusers' `ModelMixin.num_parameters` for a quantized model: each `ViDiTQLinear` weight counts as the
    `out_features x in_features` elements of the `nn.Linear` it stands for (not its codes, packed two
    per byte for W4), so the count equals the floating-point model's, as bitsandbytes, quanto and torchao report it.
    A timestep-wise layer's second copy is the same weight: counted once. The quantized weights are frozen, so
    `only_trainable` leaves them out; the biases and the floating-point layers count as diffusers counts them."""
    count = type(model).num_parameters(model, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if only_trainable:
        return count
    layers = [m for m in model.modules() if isinstance(m, ViDiTQLinear)]
    # their codes, scales, zero points and smoothing factors are frozen parameters too (so that device maps offload
    # them): counted as the weight they stand for instead
    stored = sum(p.numel() for m in layers for n, p in m.named_parameters(recurse=False) if n in ViDiTQLinear.STATE)
    return count - stored + sum(m.in_features * m.out_features for m in layers)
