"""JSON files, written atomically (`atomic.atomic_path`): a crash never leaves a half-written plan or cache under
its final name."""

from __future__ import annotations

import json
import os

from .atomic import atomic_path


def json_form(value):
    """`json.dump`'s hook for objects that know their JSON form: a plan's `LayerSpec` entries (`to_json`)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=json_form)


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)
