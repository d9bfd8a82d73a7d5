"""JSON files written atomically (temp file in the same folder, then `os.replace`): a crash never leaves a
half-written plan or cache under its final name."""

from __future__ import annotations

import json
import os


def json_form(value):
    """`json.dump`'s hook for objects that know their JSON form: a plan's `LayerSpec` entries (`to_json`)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(path: str | os.PathLike, data) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, default=json_form)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)
