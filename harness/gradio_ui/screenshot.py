"""Screenshot of the Gradio app after one generation (headless Chromium + Playwright), for the README.

    python -m harness.gradio_ui.screenshot [OUT.png]     (default docs/gradio_app.png; Chromium: harness/browser.py)

Starts the real app (`python -m gradio_app`), generates "a thick handwritten digit 7" (seed 0, 20 steps) with
the bundled pipeline, waits for the three images and their metrics, and writes the PNG atomically."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..browser import chromium, launch_chromium
from .server import ROOT, AppServer

OUT = ROOT / "docs" / "gradio_app.png"
PROMPT = "a thick handwritten digit 7"


def main(out: Path = OUT) -> None:
    from playwright.sync_api import expect, sync_playwright

    server = AppServer(Path(tempfile.mkdtemp(prefix="viditq-gradio-shot-")) / "app.log").start()
    try:
        server.wait_for_log("models ready")
        with sync_playwright() as p:
            browser = launch_chromium(p, chromium())
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(server.url, wait_until="networkidle")
            page.get_by_label("Prompt", exact=True).fill(PROMPT)
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text(f"“{PROMPT}”", timeout=180_000)
            page.wait_for_function("[...document.querySelectorAll('[id^=image-] img')]"
                                   ".filter(i => i.complete && i.naturalWidth > 0).length === 3")
            page.wait_for_timeout(500)
            save_atomically(page, out)
            browser.close()
    finally:
        server.stop()


def save_atomically(page, out: Path) -> None:
    """The whole page as a PNG: a temporary name beside `out`, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    page.screenshot(path=str(tmp), full_page=True)
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:2]))
