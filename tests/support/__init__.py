"""Helpers shared by the tests: a local Hub server, worker scripts for multi-process runs, what the app tests
need installed (provision.py)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
