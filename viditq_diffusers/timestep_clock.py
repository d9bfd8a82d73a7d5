"""The timestep clock of timestep-wise plans: layers with an early weight copy (`ViDiTQLinear.early_*`) need
the timestep of the current denoising step. A forward pre-hook on the model reads the `timestep` argument as
the pipeline passes it and stores it where those layers look.

The hook is an object, not a closure, so `copy.deepcopy(model)` gives the copy its own clock, shared by the
copy's layers. Under `torch.compile` the timestep is a Python number the graph guards on: expect one
recompilation per distinct timestep for models with timestep-wise layers.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .nn import ViDiTQLinear


class TimestepClock:
    def __init__(self):
        self.timestep: float | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep")
        if t is None:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            t = bound.get("timestep")
        if t is None:
            raise ValueError(f"{type(module).__name__} has timestep-wise quantized layers, which need the `timestep` "
                             f"argument of its forward; pass timestep=... (diffusers pipelines do)")
        t = torch.as_tensor(t).flatten()
        self.timestep = float(t.max())  # one step's batch shares its timestep (CFG halves included)


def install_clock(model: nn.Module) -> TimestepClock | None:
    """Give the model's timestep-wise layers a clock driven by the model's forward; None if it has none."""
    layers = [m for m in model.modules() if isinstance(m, ViDiTQLinear) and m.early_weight_bits is not None]
    if not layers:
        return None
    clock = TimestepClock()
    model.register_forward_pre_hook(clock, with_kwargs=True)
    for layer in layers:
        layer.clock = clock
    return clock
