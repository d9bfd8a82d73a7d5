"""The pack's shipped API workflows, with test stand-ins for what only a full-size PixArt install has.

The shipped workflows use the stock PixArt nodes (UNETLoader, CLIPLoader + CLIPTextEncode, VAELoader +
VAEDecode). The reference pipeline is tiny, and ComfyUI builds none of those three at its size (see
reference_pixart.py and fixture_nodes), so the tests swap exactly those nodes: the FP model comes from
ViDiT-Q Load of the converted reference, text and VAE from the fixture nodes. LoRA nodes get the
reference LoRA (reference_models/pixart_digits_lora) instead of the shipped file name. Everything else
(the ViDiT-Q nodes, LoraLoaderModelOnly, KSampler, SaveImage, SaveLatent) runs as shipped, with a smaller
latent and fewer steps. server_home.py puts these files where the server finds them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parents[2] / "comfyui_nodes" / "workflows"
FP_FILE = "pixart_digits_fp.safetensors"
FP_COPY_FILE = "pixart_digits_fp_copy.safetensors"  # the same model under a name no earlier prompt cached
LORA_FILE = "pixart_digits_lora.safetensors"
PROMPTS = {"positive": "a thick handwritten digit 7", "negative": ""}
LATENT_PX = 320  # 40x40 latents: ComfyUI's PixArt position embedding breaks below 33 latent pixels


def shipped(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def with_stand_ins(workflow: dict, steps: int = 12, calibration_steps: int = 6) -> dict:
    out = copy.deepcopy(workflow)
    for node_id, node in list(out.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("CLIPLoader", "VAELoader"):
            del out[node_id]
        elif kind == "UNETLoader":
            out[node_id] = {"class_type": "ViDiTQLoad", "inputs": {"model_name": FP_FILE}}
        elif kind == "CLIPTextEncode":
            title = node.get("_meta", {}).get("title")
            out[node_id] = {"class_type": "ViDiTQTestDigitsTextEncode", "inputs": {"text": PROMPTS[title]}}
        elif kind == "VAEDecode":
            out[node_id] = {"class_type": "ViDiTQTestDigitsVAEDecode", "inputs": {"samples": inputs["samples"]}}
        elif kind in ("LoraLoaderModelOnly", "ViDiTQLora"):
            inputs["lora_name"] = LORA_FILE
        elif kind == "EmptyLatentImage":
            inputs.update(width=LATENT_PX, height=LATENT_PX)
        elif kind == "KSampler":
            inputs["steps"] = steps
        elif kind == "ViDiTQCalibrate":
            inputs["steps"] = calibration_steps
    return out
