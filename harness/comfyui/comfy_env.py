"""Run code in ComfyUI's venv: the environment its processes get, and whether this process is one.

The project's tools run in the project's venv; real ComfyUI lives in its own venv (install_comfyui.py). Its
server (server.py), the reference conversion (reference_pixart.py) and the tier-2 tests (re-run under that venv's
pytest by tests/apps/comfyui/venv_tests.py) all run there with `env()`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import install_comfyui

REPO = install_comfyui.REPO


def in_comfyui_venv() -> bool:
    return Path(sys.prefix).resolve() == (install_comfyui.home() / "venv").resolve()


def env() -> dict:
    """The environment for ComfyUI's venv: this checkout's core, pack, harness and tests importable, and the C++
    kernels built in a cache of its own: a build against this venv's torch headers in the project venv's cache
    would make the next process of either venv rebuild every kernel (about a minute each)."""
    out = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               VIDITQ_KERNEL_CACHE=str(install_comfyui.home() / "kernels"))
    out.pop("VIRTUAL_ENV", None)
    return out

