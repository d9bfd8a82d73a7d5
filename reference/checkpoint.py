"""Resumable training checkpoints as safetensors + JSON (no pickle): model / EMA / optimizer / RNG state.

A checkpoint ``<dir>/<name>.safetensors`` holds every tensor under a prefixed key (``model.*``, ``ema.*``,
``opt.state.<param index>.<field>``, ``rng``); its metadata holds one JSON string with the rest (step, seconds
spent, optimizer param groups, free-form extras). Written to a temporary file, then renamed.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from viditq_diffusers.atomic import atomic_path


def save_checkpoint(directory: str, name: str, *, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None,
                    **extra) -> None:
    tensors = {f"{key}.{k}": v.detach().contiguous() for key, m in modules.items()
               for k, v in m.state_dict().items()}
    meta = dict(extra)
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, fields in state["state"].items():
            for k, v in fields.items():
                tensors[f"opt.state.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        meta["opt_param_groups"] = state["param_groups"]
    if generator is not None:
        tensors["rng"] = generator.get_state()
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, name + ".safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"json": json.dumps(meta)})


def load_checkpoint(directory: str, name: str, *, modules: dict[str, torch.nn.Module] | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generator: torch.Generator | None = None) -> dict | None:
    """Restore into the given objects; returns the JSON extras, or None if there is no checkpoint."""
    path = os.path.join(directory, name + ".safetensors")
    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["json"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, m in (modules or {}).items():
        m.load_state_dict({k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")})
    if optimizer is not None:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("opt.state."):
                i, field = k[len("opt.state."):].split(".", 1)
                state.setdefault(int(i), {})[field] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    if generator is not None and "rng" in tensors:
        generator.set_state(tensors["rng"])
    return meta
