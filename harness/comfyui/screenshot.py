"""Screenshot of a shipped workflow in ComfyUI's web UI (headless Chromium + Playwright), for the pack's README.

    pip install playwright     (into ComfyUI's venv; and a Chromium, see harness/browser.py)
    python -m harness.comfyui.screenshot [WORKFLOW_ui.json] [OUT.png]

Runs under ComfyUI's venv (for Playwright); starts a server with the pack, loads the workflow into the
page with the frontend's `app.loadGraphData`, and saves a PNG.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ..browser import chromium, launch_chromium
from . import workflows
from .server import ComfyServer

DEFAULT = workflows.WORKFLOWS / "pixart_calibrate_quantize_save_ui.json"
OUT = workflows.WORKFLOWS.parent / "docs" / "workflow_calibrate_quantize.png"
PLACEHOLDERS = [("diffusion_models", "PixArt-XL-2-512x512.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors"),
                ("vae", "sd-vae-ft-ema.safetensors")]


def main(workflow: Path = DEFAULT, out: Path = OUT) -> None:
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="viditq-shot-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "viditq").symlink_to(workflows.WORKFLOWS.parent)
    for folder, name in PLACEHOLDERS:  # empty files, so the loaders' file pickers show the example's names
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).touch()
    server = ComfyServer(base).start()
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p, chromium())
            page = browser.new_page(viewport={"width": 2000, "height": 1100})
            page.goto(server.url, wait_until="networkidle")
            page.wait_for_function("window.app && window.app.graph", timeout=60000)
            page.evaluate("(wf) => window.app.loadGraphData(wf)", json.loads(workflow.read_text()))
            page.wait_for_timeout(3000)
            page.keyboard.press("Escape")  # close a "missing models" dialog, if any
            page.wait_for_timeout(1000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.stop()
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:3]))
