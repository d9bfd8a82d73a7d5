"""Start the real app (`python -m gradio_app`) as a subprocess on 127.0.0.1, wait until it serves, stop it by PID.

For the app's tests (tests/apps/test_gradio_app.py) and benchmarks/gradio_app.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import REPO as ROOT, free_port


class AppServer:
    """`python -m gradio_app --port P --threads 1` with its output in `log_path`."""

    def __init__(self, log_path: Path, env: dict | None = None, args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.env, self.args = Path(log_path), env, tuple(args)
        self.process = None
        self.served_after: float | None = None  # seconds from process start until the page answered 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 120) -> "AppServer":
        env = {**os.environ, **(self.env or {}), "GRADIO_ANALYTICS_ENABLED": "False",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        cmd = [sys.executable, "-m", "gradio_app", "--port", str(self.port), "--threads", "1", *self.args]
        started = time.perf_counter()
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        self.served_after = time.perf_counter() - started
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the app did not serve {self.url} within {timeout} s:\n{self.log()[-4000:]}")

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while text not in self.log():
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"no {text!r} in the app's log:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the app and nothing else
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

