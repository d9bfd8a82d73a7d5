"""Calibration: activation statistics recorded through forward hooks while the model runs.

This first slice records what the naive baseline needs: the absmax of every linear
layer's input over the calibration run, reduced as it streams (no activation is stored).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def input_absmax(model: nn.Module, run: Callable[[], object]) -> dict[str, float]:
    """`{linear layer name: max |input|}` over everything `run()` makes the model compute.

    `run` drives the model (e.g. `lambda: pipe(prompts, num_inference_steps=20)`); the hooks
    are removed afterwards, also when `run` fails.
    """
    absmax: dict[str, float] = {}

    def observe(name):
        def hook(module, args):
            value = args[0].detach().abs().amax().item()
            absmax[name] = max(absmax.get(name, 0.0), value)
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if not absmax:
        raise ValueError("the calibration run never called a linear layer of this model; check that `run` uses it.")
    return absmax
