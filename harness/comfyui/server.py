"""Start real ComfyUI (`main.py --cpu --listen 127.0.0.1`) from its venv, talk to its HTTP API, stop it by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import free_port
from . import comfy_env, install_comfyui


class ComfyServer:
    def __init__(self, base_dir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()):
        """`extra_args`: more main.py options, e.g. ("--cache-none",) to re-run every node in every prompt."""
        self.base_dir, self.port, self.extra_args = Path(base_dir), port or free_port(), tuple(extra_args)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.process = None

    def start(self, timeout: float = 180) -> "ComfyServer":
        for sub in ("custom_nodes", "user", "input", "output", "models/diffusion_models"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cmd = [str(install_comfyui.python()), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), *self.extra_args]
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(cmd, cwd=install_comfyui.comfyui_dir(), env=comfy_env.env(),
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM the server by its PID (its process group, which holds only it), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(20)

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, workflow: dict) -> tuple[int, dict]:
        """(HTTP status, JSON body) of POST /prompt; 400 bodies carry ComfyUI's validation errors."""
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, workflow: dict, timeout: float = 600) -> dict:
        """Queue `workflow`, poll /history until it finishes; its history entry (status + outputs)."""
        status, body = self.post_prompt(workflow)
        if status != 200:
            raise RuntimeError(f"/prompt answered {status}: {json.dumps(body)[:3000]}")
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log()}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log()}")


def execution_error(entry: dict) -> dict | None:
    """The `execution_error` message of a history entry (node_type, exception_message, ...), if any."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data
    return None
