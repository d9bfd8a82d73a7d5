"""Set up real ComfyUI inside this (ComfyUI venv) Python process, for the tier-2 tests
and reference_pixart.py.

`setup(base_dir)` puts ComfyUI on sys.path, forces CPU, points its model folders at `base_dir` and
imports the pack's nodes. Call it before anything imports `comfy`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import install_comfyui



def import_comfy():
    """Make `comfy` importable, on the CPU (its device is chosen when comfy.model_management is imported)."""
    if str(install_comfyui.comfyui_dir()) not in sys.path:
        sys.path.insert(0, str(install_comfyui.comfyui_dir()))
    from comfy.cli_args import args

    args.cpu = True
    return args


def setup(base_dir: Path):
    import_comfy().base_directory = str(base_dir)
    import folder_paths

    os.makedirs(base_dir / "models" / "diffusion_models", exist_ok=True)
    folder_paths.add_model_folder_path("diffusion_models", str(base_dir / "models" / "diffusion_models"),
                                       is_default=True)
    folder_paths.set_output_directory(str(base_dir / "output"))
    from comfyui_nodes import nodes

    return nodes
