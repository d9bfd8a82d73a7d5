"""What tier-3 tests and benchmarks/comfyui.py read back from a finished prompt: its status and latents."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file


def succeeded(entry: dict) -> dict:
    """The /history entry, after checking that the prompt ran to the end."""
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


def latent(server, entry: dict, node_id: str) -> torch.Tensor:
    """The latent that SaveLatent node `node_id` wrote into the server's output folder."""
    (item,) = entry["outputs"][node_id]["latents"]
    return load_file(server.base_dir / "output" / item["subfolder"] / item["filename"])["latent_tensor"]


def psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR of `x` against `ref` in dB, with the peak taken as the range of `ref`."""
    return float(10 * torch.log10((ref.max() - ref.min()) ** 2 / ((ref - x) ** 2).mean()))
