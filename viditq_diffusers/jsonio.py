"""JSON files, written atomically (`atomic.atomic_path`): a crash never leaves a half-written plan or cache under
its final name."""

from __future__ import annotations

import json
import os

from .atomic import atomic_path


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)
