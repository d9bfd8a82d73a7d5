"""Starting the real apps for tests and benchmarks: real ComfyUI installed in its own venv, its server, the Gradio
app as a process, headless Chromium.

Used from the repository root, like benchmarks/ (`python -m harness.comfyui.install_comfyui`); never installed,
never imported by the core or the apps, and it imports neither pytest nor tests/ (the pytest side, the fixtures
that install what is missing or skip, lives in tests/apps/conftest.py and tests/support/provision.py).

    comfyui/   install_comfyui (ComfyUI 0.30.0 into a cached venv), comfy_env (its environment), server
               (ComfyServer), server_home (a server's base directory with the reference models), workflows
               (the shipped workflows with stand-ins), outputs, inprocess / reference_pixart (run in ComfyUI's
               venv), fixture_nodes (stand-in text encoder and VAE nodes), workflow_ui, screenshot
    gradio_ui/ server (AppServer: `python -m gradio_app` as a process), screenshot
    browser    find and launch a headless Chromium for Playwright
"""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the repository root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
