"""A LoRA branch added to a layer's output: pure tensor math, no PEFT, so the diffusers/PEFT LoRA layer
(`lora.py`) and the ComfyUI node pack share it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def add_low_rank(result: torch.Tensor, down: torch.Tensor, weight_B: torch.Tensor, bias_B: Optional[torch.Tensor],
                 scaling: float) -> torch.Tensor:
    """`result + scaling * (down @ weight_B.T + bias_B)`, the up-projection accumulating into `result`.

    `result` is the base layer's fresh output. One `addmm` reads and writes it once, where
    `result + lora_B(down) * scaling` makes three passes over an output-sized tensor (the branch, its scaled
    copy, the sum): at rank 16 those passes cost more than the rank-16 GEMMs. Without autograd the sum is
    written into `result` itself. A bias or a dtype that differs from `result`'s takes the plain expression.
    """
    if bias_B is not None or down.dtype != result.dtype or weight_B.dtype != result.dtype:
        return result + (F.linear(down, weight_B, bias_B) * scaling).to(result.dtype)
    flat, rows = result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1])
    if torch.is_grad_enabled():
        flat = torch.addmm(flat, rows, weight_B.t(), alpha=scaling)
    else:
        flat.addmm_(rows, weight_B.t(), alpha=scaling)
    return flat.view(result.shape)
