"""Building the C++ CPU kernels (`cpu_int16.cpp`, `cpu_direct.cpp`, `cpu_vnni.cpp`, `cpu_amx.cpp`, `cpu_balance.cpp`)
with `torch.utils.cpp_extension`, when `kernels.warmup()` asks for them.

Each is compiled once per machine, torch install and checkout (about a minute) into its own folder under
`~/.cache/viditq_diffusers/kernels` (or `$VIDITQ_KERNEL_CACHE`); later warmups only load it. Needs a C++
compiler and ninja (a dependency; pip's copy is found even in an unactivated venv). Where the build fails, a
RuntimeWarning names the reason and the routes that need the kernel say so (`kernels.routes`): the torch or
oneDNN route runs instead.

Nothing here builds behind the caller's back: `loaded` and `missing_reason` only report.

A build killed midway (Ctrl-C, an OOM kill) leaves torch's lock file (`lock`) in its folder, and torch's next build
there waits for it forever. So every build (and load) holds our own advisory lock (`builder.lock`, `fcntl.flock`,
which the OS releases when its process dies) around torch's: whoever holds ours knows no other of our builds is
running, so a torch lock found then is stale, and is removed with a log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import warnings

import torch

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]  # no contraction: epilogues round as torch
NOT_BUILT = "C++ kernel not built (run kernels.warmup())"

_modules: dict[str, object | None] = {}  # name -> the loaded module, or None where its build failed
_lock = threading.RLock()  # one build at a time (the Gradio app warms up while requests may arrive)


def unsupported_reason() -> str | None:
    """Why this machine cannot run the C++ kernels at all, or None where it can (x86 with AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the C++ CPU kernels are x86 only (this is {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the C++ CPU kernels need AVX2, which this CPU lacks"
    return None


def build_directory(name: str) -> str:
    root = os.environ.get("VIDITQ_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "viditq_diffusers", "kernels")
    # The build bakes in this torch's headers and this checkout's sources: two venvs or checkouts that shared a
    # folder would keep rebuilding each other's modules, so each pair gets its own.
    where = hashlib.sha256(f"{os.path.dirname(torch.__file__)}|{HERE}".encode()).hexdigest()[:10]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{where}".replace("+", "_")
    return os.path.join(root, tag, name)


def is_compiled(name: str) -> bool:
    """Whether a compiled module for `name` is in the cache (loading it takes a second, not a minute)."""
    directory = build_directory(name)
    return os.path.isdir(directory) and any(entry.endswith(".so") for entry in os.listdir(directory))


def loaded(name: str):
    """The module `name` if `build` loaded it, else None (never builds)."""
    return _modules.get(name)


def missing_reason(name: str) -> str | None:
    """Why module `name` is not loaded, or None where it is."""
    if _modules.get(name) is not None:
        return None
    unsupported = unsupported_reason()
    if unsupported:
        return unsupported
    if name in _modules:
        return "its C++ build failed (see the RuntimeWarning; install a C++ compiler and ninja)"
    return NOT_BUILT


def build(name: str, source: str, purpose: str, fallback: str):
    """Build (first time on this machine) or load the module `name` from `kernels/<source>`; None where this CPU
    or machine cannot run or build it (warned once). `purpose` and `fallback` complete the warning."""
    with _lock:
        if name in _modules:
            return _modules[name]
        if unsupported_reason():
            return None
        _modules[name] = _load(name, source, purpose, fallback)
        return _modules[name]


TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton in the build folder
BUILDER_LOCK = "builder.lock"


@contextlib.contextmanager
def builder_lock(directory: str):
    """Hold the advisory lock of our builds in `directory` (waits while another process builds there)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no stale-lock recovery, torch's lock alone
        yield
        return
    with open(os.path.join(directory, BUILDER_LOCK), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_stale_torch_lock(directory: str) -> bool:
    """Remove torch's lock file from `directory`, which a killed build left: call it holding `builder_lock`, under
    which no live build of ours can own it. True where there was one."""
    path = os.path.join(directory, TORCH_LOCK)
    if not os.path.exists(path):
        return False
    logger.warning("viditq: removing the stale build lock %s, left by a C++ kernel build that was interrupted; "
                   "building again", path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return True


def _load(name: str, source: str, purpose: str, fallback: str):
    from torch.utils.cpp_extension import load

    scripts = sysconfig.get_path("scripts")  # pip's `ninja` lands here, which is not on PATH without activation
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    directory = build_directory(name)
    os.makedirs(directory, exist_ok=True)
    try:
        with builder_lock(directory):
            clear_stale_torch_lock(directory)
            return load(name=name, sources=[os.path.join(HERE, source)], extra_cflags=CFLAGS,
                        extra_ldflags=["-fopenmp"], extra_include_paths=[HERE], build_directory=directory)
    except Exception as error:  # no compiler, no ninja, no Python headers
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        warnings.warn(f"viditq: {purpose} could not be built ({type(error).__name__}: {first_line}; build files "
                      f"in {directory}); {fallback}. Install a C++ compiler and ninja to enable it, or set "
                      f"VIDITQ_KERNELS=torch.", RuntimeWarning, stacklevel=4)
        return None
