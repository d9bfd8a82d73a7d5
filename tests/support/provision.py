"""What the app tests need beyond the dev extra, got once per pytest session: real ComfyUI and a Chromium.

`comfyui()` and `chromium()` are called by the session fixtures in tests/apps/conftest.py. Each installs what
is missing at most once per session, within a time limit, with every command's output in a log file under
`logs_dir()`. When the thing cannot be had (no network, no root for apt, a failed pip), they raise
`Unavailable` with one line that names the log, and the fixture turns it into a skip of exactly the tests that
need it.

Environment: `VIDITQ_TEST_INSTALL=0` forbids installing anything (the tests that need a missing thing skip);
`VIDITQ_CHROMIUM` names the browser to use; `VIDITQ_TEST_LOGS` moves the logs (default ~/.cache/viditq-tests);
`VIDITQ_TEST_COMFYUI_TIMEOUT` / `VIDITQ_TEST_CHROMIUM_TIMEOUT` change the time limits (seconds);
`VIDITQ_COMFYUI_HOME` moves the ComfyUI install (harness/comfyui/install_comfyui.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.browser import HOW_TO_INSTALL, find_chromium, starts
from harness.comfyui import install_comfyui

COMFYUI_TIMEOUT_S = float(os.environ.get("VIDITQ_TEST_COMFYUI_TIMEOUT", 1500))  # a cold pip install of torch & co.
CHROMIUM_TIMEOUT_S = float(os.environ.get("VIDITQ_TEST_CHROMIUM_TIMEOUT", 900))


class Unavailable(Exception):
    """What a test needs cannot be had here; the message (one line) says why and where the log is."""


def logs_dir() -> Path:
    return Path(os.environ.get("VIDITQ_TEST_LOGS", Path.home() / ".cache" / "viditq-tests"))


def installing_allowed() -> bool:
    return os.environ.get("VIDITQ_TEST_INSTALL", "1") != "0"


def run_logged(commands: list[list[str]], log: Path, timeout_s: float, env: dict | None = None) -> str | None:
    """Run `commands` in order, their output appended to `log`, all within `timeout_s` seconds together.
    None when every one succeeds; otherwise what went wrong, in a few words."""
    log.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(log, "a") as out:
        for cmd in commands:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            try:  # its own session, so a timeout can stop it with everything it started (pip, dpkg)
                process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, start_new_session=True)
            except OSError as error:
                return f"{cmd[0]} could not start ({error})"
            try:
                code = process.wait(max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return f"`{short(cmd)}` ran past the {timeout_s:.0f} s limit"
            if code != 0:
                return f"`{short(cmd)}` exited with {code}"
    return None


def short(cmd: list[str]) -> str:
    """A command as a reader knows it: file names without their folders."""
    return " ".join(Path(part).name if os.sep in part else part for part in cmd)


def comfyui() -> Path:
    """The folder of a complete ComfyUI install (harness/comfyui/install_comfyui.py), installed if missing."""
    if install_comfyui.is_installed():
        return install_comfyui.home()
    how = f"`{Path(sys.executable).name}  harness/comfyui/install_comfyui.py` installs it"
    if not installing_allowed():
        raise Unavailable(f"real ComfyUI is not installed at {install_comfyui.home()} and VIDITQ_TEST_INSTALL=0; {how}")
    log = logs_dir() / "comfyui-install.log"
    log.unlink(missing_ok=True)
    error = run_logged([[sys.executable, install_comfyui.__file__]], log, COMFYUI_TIMEOUT_S)
    if error or not install_comfyui.is_installed():
        raise Unavailable(f"real ComfyUI could not be installed ({error or 'incomplete'}); log: {log}")
    return install_comfyui.home()


def chromium() -> str:
    """The path of a Chromium for Playwright; installed if missing: Debian's package with apt-get (as root), else
    Playwright's own build (`python -m playwright install chromium`, no root needed; its download host must be
    reachable)."""
    found = find_chromium()
    if found:
        broken = starts(found)
        if broken:
            raise Unavailable(f"the Chromium at {found} does not start ({broken}); set VIDITQ_CHROMIUM to another")
        return found
    if not installing_allowed():
        raise Unavailable(f"no Chromium and VIDITQ_TEST_INSTALL=0; {HOW_TO_INSTALL}")
    log = logs_dir() / "chromium-install.log"
    log.unlink(missing_ok=True)
    errors = []
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        errors.append(run_logged([["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]], log,
                                 CHROMIUM_TIMEOUT_S, env))
        found = find_chromium()
    else:
        errors.append("apt-get needs root" if shutil.which("apt-get") else "no apt-get")
    if not found:
        errors.append(run_logged([[sys.executable, "-m", "playwright", "install", "chromium"]], log,
                                 CHROMIUM_TIMEOUT_S))
        found = find_chromium()
    if not found:
        why = "; ".join(e for e in errors if e) or "none found after installing"
        raise Unavailable(f"no Chromium could be installed ({why}); log: {log}")
    broken = starts(found)
    if broken:
        raise Unavailable(f"the Chromium installed at {found} does not start ({broken}); log: {log}")
    return found
