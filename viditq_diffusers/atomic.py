"""Atomic writes: a crash or an error never leaves a half-written file, or a half-replaced checkpoint, under its
final name.

Files (`atomic_path`): the data is written under a temporary name in the target's own folder (so the rename stays
on one file system), flushed to disk, and only then given the final name with `os.replace`, which swaps it in at
once. On an error the temporary is removed and the file that was there before stays as it was.

Folders (`atomic_folder`): a checkpoint is many files (config.json, a shard index, shards, a pipeline's subfolders)
that only load together, so the folder is replaced as a whole, never file by file. Moving files in one by one (what
this module did before) leaves the new weights with the old config.json when a crash falls between two moves, and
writing into the target lets a stale shard index outlive the save. So:

1. the whole new checkpoint is written into a fresh sibling, `<parent>/.viditq-tmp-<hex>-<name>`: the same parent,
   hence the same file system, so renames between the two are atomic and copy nothing;
2. every file and folder in it is flushed to disk (fsync), so the rename below can never reach the disk first;
3. it takes the target's place in one step. A missing target: `rename`, atomic by POSIX. An existing one: Linux's
   `renameat2(RENAME_EXCHANGE)` (glibc >= 2.28, Linux >= 3.15; ext4, xfs, btrfs, tmpfs...) swaps the two names at
   once, so at every instant the target name holds the whole old checkpoint or the whole new one;
4. the temporary name, which now holds the old checkpoint, is removed (a crash here only leaves a sibling behind).

Where the exchange is missing (other systems, file systems that answer ENOSYS, EINVAL or ENOTSUP) the best effort is
two renames: the target to `<parent>/.viditq-old-<hex>-<name>`, then the new folder to the target. A crash between
the two leaves no target but the whole old checkpoint under the -old name; `recover_folder`, which the next save and
the package's loaders (`checkpoint.load_any`, `viditq info`) run first, renames it back. So even there a folder loads
as the old or the new checkpoint, except that diffusers' own `from_pretrained` finds nothing in that window.

Leftovers of killed saves (siblings named as above, and `.viditq-tmp-*` inside the target from versions that wrote
their temporary there) are removed by the next save of that target; loading never sees them: they are siblings, or
hidden names inside that diffusers does not read. A running save holds an flock on its temporary folder, and cleaning
skips any locked one, so two saves never delete each other's work.

What a save keeps of the folder it replaces: the old checkpoint never survives into the new one (that would be a
mix), everything else does. The old checkpoint is the top-level files ending in `CHECKPOINT_SUFFIXES` (config.json,
model_index.json, shard indexes, weights in any format) and the component subfolders its model_index.json names.
Anything else (a README.md, notes, an images/ folder the user added) is hard-linked into the new folder before the
swap, unless the new checkpoint has an entry of the same name, which wins. A non-empty folder that is not a
diffusers checkpoint (no config.json or model_index.json written by diffusers) is refused unless the caller passes
`overwrite=True`; the same rule then applies to its files.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock, so no protection of a concurrent save's temporary folder
    fcntl = None

TEMP_PREFIX = ".viditq-tmp-"  # hidden, and easy to recognise (and delete) if a process is killed mid-write
OLD_PREFIX = ".viditq-old-"  # the old checkpoint moved aside by the two-rename fallback, until the new one is in
CHECKPOINT_MARKERS = ("model_index.json", "config.json")
CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")
UNSUPPORTED_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_SIBLING = re.compile(r"\.viditq-(tmp|old)-[0-9a-f]{32}-(.+)\Z", re.DOTALL)
_ACTIVE = contextvars.ContextVar("viditq_active_temp_folders", default=())  # temp folders being written now


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Make a folder's entries (a new name, a rename) durable; POSIX only (Windows cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# ------------------------------------------------------------------------------------------ the one-step swap


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, TypeError, AttributeError):  # no such symbol (glibc < 2.28, musl, macOS) or no C library
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_folders(a: str, b: str) -> None:
    """Swap the names `a` and `b` (both exist) in one atomic step; an OSError with an errno in
    `UNSUPPORTED_EXCHANGE` where the system or the file system cannot."""
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available in this C library", a)
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), a, None, b)


# ------------------------------------------------------------------------------------------ names and locks


def _key(name: str) -> str:
    """The target's name as it appears in its siblings' names (hashed when a long name would not fit)."""
    return name if len(os.fsencode(name)) <= 200 else hashlib.sha256(os.fsencode(name)).hexdigest()


def _sibling(directory: str, prefix: str) -> str:
    parent, name = os.path.split(directory)
    return os.path.join(parent, f"{prefix}{uuid.uuid4().hex}-{_key(name)}")


def _siblings(directory: str) -> list[tuple[str, str]]:
    """[(kind "tmp" or "old", path)] of the temporaries that saves of `directory` created next to it."""
    parent, name = os.path.split(directory)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _SIBLING.match(entry)
        if match and match.group(2) == _key(name):
            found.append((match.group(1), os.path.join(parent, entry)))
    return found


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _lock(path: str, block: bool) -> int | None:
    """An fd holding an exclusive flock on the folder `path` (closing it releases the lock), or None on a system
    without flock. Raises BlockingIOError when `block` is false and a running save holds it, OSError when it is
    gone."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _remove(path: str) -> None:
    """Remove a leftover file, or a leftover folder unless a running save holds its lock."""
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            fd = _lock(path, block=False)
        except OSError:  # locked by a save that is writing it right now, or already gone
            return
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            _unlock(fd)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def recover_folder(directory: str | os.PathLike) -> None:
    """Finish what a killed fallback save left: if `directory` is missing but its old checkpoint was moved aside
    (`<parent>/.viditq-old-*-<name>`), move it back. Does nothing otherwise (it never deletes anything)."""
    directory = os.path.realpath(os.fspath(directory))
    if os.path.lexists(directory):
        return
    asides = [path for kind, path in _siblings(directory) if kind == "old"]
    for path in sorted(asides, key=_mtime, reverse=True):  # the newest, should two fallback saves have crashed
        try:
            fd = _lock(path, block=False)
        except OSError:  # a running save holds it (it is between its two renames), or it is gone
            continue
        try:
            os.rename(path, directory)
        finally:
            _unlock(fd)
        _fsync_dir(os.path.dirname(directory))
        return


# ------------------------------------------------------------------------------------------ what is replaced


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_checkpoint(directory: str) -> bool:
    """Whether `directory` holds a diffusers (or ViDiT-Q) model or pipeline: a config.json or model_index.json
    that diffusers wrote (it names a `_class_name`)."""
    for marker in CHECKPOINT_MARKERS:
        content = _read_json(os.path.join(directory, marker))
        if isinstance(content, dict) and ("_class_name" in content or "_diffusers_version" in content):
            return True
    return False


def _check_target(directory: str, overwrite: bool) -> None:
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory!r} is a file, not a folder; a checkpoint is saved as a folder. "
                                 f"Pass a new folder path, or one that holds a checkpoint to replace.")
    if os.path.ismount(directory):
        raise OSError(errno.EBUSY, f"{directory!r} is a mount point: a save replaces the folder as a whole, which "
                      f"cannot be done to a mount point. Save into a folder inside it, e.g. "
                      f"{os.path.join(directory, 'checkpoint')!r}.", directory)
    entries = sorted(e for e in os.listdir(directory) if not e.startswith(TEMP_PREFIX))
    if entries and not overwrite and not is_checkpoint(directory):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise FileExistsError(
            f"{directory!r} is not empty ({shown}) and holds no diffusers checkpoint (no config.json or "
            f"model_index.json written by diffusers), so saving there could destroy unrelated files. Save into a "
            f"new or empty folder, or pass overwrite=True to save there anyway (files ending in "
            f"{', '.join(CHECKPOINT_SUFFIXES)} are then replaced; the others are kept)."
        )


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)
    return destination


def _carry_over(old: str, new: str) -> None:
    """Hard-link into `new` what `old` holds beside its checkpoint (see the module docstring for the rule)."""
    index = _read_json(os.path.join(old, "model_index.json"))
    components = {k for k in index if not k.startswith("_")} if isinstance(index, dict) else set()
    for entry in os.scandir(old):
        destination = os.path.join(new, entry.name)
        if entry.name.startswith(TEMP_PREFIX) or os.path.lexists(destination):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir():
            if entry.name not in components:
                shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
        elif not entry.name.lower().endswith(CHECKPOINT_SUFFIXES):
            _link_or_copy(entry.path, destination)


def _make_durable(folder: str) -> None:
    """Give the files the save wrote the usual permissions, then fsync every file and folder under `folder`."""
    for root, folders, files in os.walk(folder, topdown=False):
        for file in files:
            path = os.path.join(root, file)
            if not os.path.islink(path):
                _fsync(path)
        for sub in folders:
            if not os.path.islink(os.path.join(root, sub)):
                _fsync_dir(os.path.join(root, sub))
    _fsync_dir(folder)


def _fix_modes(folder: str) -> None:
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(folder):
        for file in files:
            path = os.path.join(root, file)
            if not os.path.islink(path):
                os.chmod(path, mode)  # writers that use mkstemp leave 0600 files


def _swap_in(tmp: str, directory: str) -> None:
    """Put the finished folder `tmp` at `directory` in one step; afterwards `tmp` holds the old one, or is gone."""
    parent = os.path.dirname(directory)
    try:
        if not os.path.lexists(directory):
            os.rename(tmp, directory)
        else:
            try:
                exchange_folders(tmp, directory)
            except OSError as error:
                if error.errno not in UNSUPPORTED_EXCHANGE:
                    raise
                _swap_in_two_steps(tmp, directory)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EBUSY):
            raise
        raise OSError(error.errno, f"{directory!r} cannot be replaced by renaming ({error.strerror}): it is a mount "
                      f"point, or on another file system than its parent folder. Save into a folder inside it "
                      f"instead; it was left as it was.", directory) from error
    _fsync_dir(parent)


def _swap_in_two_steps(tmp: str, directory: str) -> None:
    """The fallback: old aside, new in, old removed. The old folder stays locked while aside, so that a
    concurrent `recover_folder` does not move it back under this save."""
    aside = _sibling(directory, OLD_PREFIX)
    lock = _lock(directory, block=True)
    try:
        os.rename(directory, aside)
        _fsync_dir(os.path.dirname(directory))
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(aside, directory)  # an error, not a crash: put the old one back at once
            raise
    finally:
        _unlock(lock)
    _fsync_dir(os.path.dirname(directory))
    shutil.rmtree(aside, ignore_errors=True)


def _new_temp(directory: str) -> tuple[str, int | None]:
    """A fresh, locked temporary sibling of `directory`, with the mode `directory` has (or a new folder's)."""
    while True:
        tmp = _sibling(directory, TEMP_PREFIX)
        os.mkdir(tmp)
        try:
            lock = _lock(tmp, block=True)
        except FileNotFoundError:  # a cleaner removed it before we could open it
            continue
        if lock is not None and os.fstat(lock).st_nlink == 0:  # ... or before we locked it
            _unlock(lock)
            continue
        if os.path.isdir(directory):
            os.chmod(tmp, stat.S_IMODE(os.stat(directory).st_mode))
        return tmp, lock


@contextlib.contextmanager
def atomic_folder(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty temporary folder to write a whole checkpoint into; when the block ends without an error it
    replaces `directory` in one step (see the module docstring), otherwise it is removed and `directory` stays as
    it was. A non-empty `directory` that is not a checkpoint is refused unless `overwrite`. Inside another
    `atomic_folder` (a pipeline saving its components) it yields `directory` itself: the outer one is atomic."""
    directory = os.path.realpath(os.fspath(directory))  # a symlink: replace the folder it points to
    if any(directory == t or directory.startswith(t + os.sep) for t in _ACTIVE.get()):
        os.makedirs(directory, exist_ok=True)
        yield directory
        return
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    recover_folder(directory)
    _check_target(directory, overwrite)
    for _, path in _siblings(directory):  # after recover_folder: an -old- sibling is no longer needed
        _remove(path)
    tmp, lock = _new_temp(directory)
    token = _ACTIVE.set(_ACTIVE.get() + (tmp,))
    try:
        yield tmp
        _fix_modes(tmp)
        if os.path.isdir(directory):
            _carry_over(directory, tmp)
        _make_durable(tmp)
        _swap_in(tmp, directory)
    finally:
        _ACTIVE.reset(token)
        _unlock(lock)
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new folder, or after the swap the old one
