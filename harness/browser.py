"""Headless Chromium for Playwright: find one (`find_chromium`, `chromium`) and launch it (`launch_chromium`).

Installs nothing: the test session installs a missing Chromium itself (tests/support/provision.py); by hand,
`apt-get install -y chromium` or `python -m playwright install chromium`.
"""

from __future__ import annotations

import os
import shutil
import subprocess

CHROMIUM_NAMES = ("chromium", "chromium-browser")
HOW_TO_INSTALL = ("install one with `apt-get install -y chromium` or `python -m playwright install chromium`, "
                  "or set VIDITQ_CHROMIUM to its path")


def find_chromium() -> str | None:
    """$VIDITQ_CHROMIUM, a `chromium` on PATH, or the Chromium Playwright downloaded; None if there is none."""
    if os.environ.get("VIDITQ_CHROMIUM"):
        return os.environ["VIDITQ_CHROMIUM"] if os.path.exists(os.environ["VIDITQ_CHROMIUM"]) else None
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        path = p.chromium.executable_path
    return path if os.path.exists(path) else None


def starts(path: str) -> str | None:
    """None if the Chromium at `path` runs (`--version`: its shared libraries load); else why not."""
    try:
        run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if run.returncode == 0 else (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]


def chromium() -> str:
    """The path of a Chromium here that starts; RuntimeError saying how to get one if there is none."""
    found = find_chromium()
    if not found:
        raise RuntimeError(f"no Chromium found; {HOW_TO_INSTALL}")
    broken = starts(found)
    if broken:
        raise RuntimeError(f"the Chromium at {found} does not start ({broken}); set VIDITQ_CHROMIUM to another")
    return found


def launch_chromium(playwright, executable: str):
    """Headless Chromium at `executable` (see `chromium`)."""
    return playwright.chromium.launch(executable_path=executable, args=["--headless", "--no-sandbox", "--disable-gpu"])
