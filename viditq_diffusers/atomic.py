"""Atomic writes: a crash or an error never leaves a half-written file under its final name.

The data is written under a temporary name in the target's own folder (so the rename stays on one file system),
flushed to disk, and only then given the final name with `os.replace`, which swaps it in at once. On an error
the temporary is removed and the file that was there before stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

TEMP_PREFIX = ".viditq-tmp-"  # hidden, and easy to recognise (and delete) if a process is killed mid-write


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path` to write to; when the block ends without an error it replaces
    `path`, otherwise it is removed. The temporary name ends with `path`'s own name, so writers that choose a
    format by the extension see the same one."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(directory: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder inside `directory` (created if needed) to write files into; when the block ends
    without an error each file moves to the same relative place under `directory`, one `os.replace` per file.
    The temporary folder is removed either way, so an error leaves `directory` as it was."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            target_root = os.path.join(directory, os.path.relpath(root, tmp))
            os.makedirs(target_root, exist_ok=True)
            for file in files:
                source = os.path.join(root, file)
                os.chmod(source, 0o666 & ~_umask())  # writers that use mkstemp leave 0600 files
                _fsync(source)
                os.replace(source, os.path.join(target_root, file))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
