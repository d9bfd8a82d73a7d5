"""Run one benchmark row in a child process of its own, so its peak RSS is its own.

The child prints its result as JSON on its last stdout line; a child that fails or is killed becomes a row with an
`error` that says why."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_json_child(command: list[str], **row) -> dict:
    """The child's JSON result, or `{**row, "error": reason}` (its last stderr line, or the signal that killed it)."""
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:160]
    if done.returncode < 0:
        reason = f"killed by signal {-done.returncode} (out of memory?)"
    return {**row, "error": reason}
