"""Re-run a tier-2 test file under ComfyUI's venv (pytest runs in the project's venv; real ComfyUI, from
harness/comfyui/install_comfyui.py, in its own). The install comes from the session fixture `comfyui_install`
(tests/apps/conftest.py), which installs it on first use or skips the test saying why."""

from __future__ import annotations

import subprocess

import pytest

from harness.comfyui import comfy_env, install_comfyui


def rerun_in_comfyui_venv(test_file: str, timeout: int = 1200) -> None:
    """Run `test_file`'s tests under ComfyUI's venv; fail with their output if any fails."""
    cmd = [str(install_comfyui.python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    result = subprocess.run(cmd, cwd=comfy_env.REPO, env=comfy_env.env(), capture_output=True, text=True,
                            timeout=timeout)
    print(result.stdout[-6000:])
    if result.returncode != 0:
        pytest.fail(f"tests in ComfyUI's venv failed (exit {result.returncode}):\n{result.stdout[-8000:]}"
                    f"\n{result.stderr[-3000:]}", pytrace=False)
