"""The base directory of a tier-3 server (tests and benchmarks/comfyui.py): the pack and the stand-in
fixture nodes in `custom_nodes`, the reference PixArt in ComfyUI's layout (and a copy, which ComfyUI
does not recognise as already loaded) in `models/diffusion_models`, the reference LoRA in `models/loras`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from . import comfy_env, install_comfyui, workflows

REPO = comfy_env.REPO
REFERENCE_LORA = REPO / "reference_models" / "pixart_digits_lora" / "pytorch_lora_weights.safetensors"


def prepare(base: Path) -> Path:
    """Fill `base` (ComfyUI's --base-directory) with what the shipped workflows' stand-ins need."""
    models, loras, custom = base / "models" / "diffusion_models", base / "models" / "loras", base / "custom_nodes"
    for folder in (models, loras, custom):
        folder.mkdir(parents=True, exist_ok=True)
    (custom / "viditq").symlink_to(REPO / "comfyui_nodes")
    (custom / "viditq_test_fixtures").symlink_to(Path(__file__).resolve().with_name("fixture_nodes"))
    subprocess.run([str(install_comfyui.python()), "-m", "harness.comfyui.reference_pixart",
                    str(models / workflows.FP_FILE)], cwd=REPO, env=comfy_env.env(), check=True)
    shutil.copy(models / workflows.FP_FILE, models / workflows.FP_COPY_FILE)
    # the diffusers/PEFT file as shipped: ComfyUI's PixArt key map reads its `transformer.*` lora_A / lora_B keys
    shutil.copy(REFERENCE_LORA, loras / workflows.LORA_FILE)
    return base
