"""Where the tests meet the ComfyUI install: run code in its venv.

pytest runs in the project's venv; real ComfyUI lives in its own venv (install_comfyui.py). Tier-2
test files re-run themselves under that venv's pytest (`rerun_in_comfyui_venv`); tier-3 tests start
its server. Both get the install from the session fixture `comfyui_install` (tests/apps/conftest.py),
which installs it on first use or skips them saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import install_comfyui

REPO = install_comfyui.REPO


def in_comfyui_venv() -> bool:
    return Path(sys.prefix).resolve() == (install_comfyui.home() / "venv").resolve()


def env() -> dict:
    """The environment for ComfyUI's venv: this checkout's core, pack and test helpers importable, and the C++
    kernels built in a cache of its own: a build against this venv's torch headers in the project venv's cache
    would make the next process of either venv rebuild every kernel (about a minute each)."""
    out = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               VIDITQ_KERNEL_CACHE=str(install_comfyui.home() / "kernels"))
    out.pop("VIRTUAL_ENV", None)
    return out


def rerun_in_comfyui_venv(test_file: str, timeout: int = 1200) -> None:
    """Run `test_file`'s tests under ComfyUI's venv; fail with their output if any fails."""
    cmd = [str(install_comfyui.python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-6000:])
    if result.returncode != 0:
        pytest.fail(f"tests in ComfyUI's venv failed (exit {result.returncode}):\n{result.stdout[-8000:]}"
                    f"\n{result.stderr[-3000:]}", pytrace=False)
