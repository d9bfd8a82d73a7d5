"""Building the C++ CPU kernels (`cpu_int16.cpp`, `cpu_direct.cpp`, `cpu_amx.cpp`, `cpu_balance.cpp`) with
`torch.utils.cpp_extension` on first use.

Each is compiled once per machine and torch version (about a minute) into its own folder under
`~/.cache/viditq_diffusers/kernels` (or `$VIDITQ_KERNEL_CACHE`). Needs a C++ compiler and ninja (a
dependency; pip's copy is found even in an unactivated venv). Where the build fails, a RuntimeWarning names
the reason and the caller's torch or oneDNN route stays in use.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
import sysconfig
import warnings

import torch

logger = logging.getLogger(__name__)
HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]  # no contraction: epilogues round as torch


def build_directory(name: str) -> str:
    root = os.environ.get("VIDITQ_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "viditq_diffusers", "kernels")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return os.path.join(root, tag, name)


@functools.cache
def extension(name: str, source: str, purpose: str, fallback: str):
    """The built module `name` from `kernels/<source>`, or None where this CPU or machine cannot run or build it
    (warned once). `purpose` and `fallback` complete the log and warning sentences."""
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    from torch.utils.cpp_extension import load

    scripts = sysconfig.get_path("scripts")  # pip's `ninja` lands here, which is not on PATH without activation
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    directory = build_directory(name)
    os.makedirs(directory, exist_ok=True)
    if not any(entry.endswith(".so") for entry in os.listdir(directory)):
        logger.warning("viditq: building %s (once per machine, about a minute) in %s", purpose, directory)
    try:
        return load(name=name, sources=[os.path.join(HERE, source)], extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"], extra_include_paths=[HERE], build_directory=directory)
    except Exception as error:  # no compiler, no ninja, no Python headers
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        warnings.warn(f"viditq: {purpose} could not be built ({type(error).__name__}: {first_line}; build files "
                      f"in {directory}); {fallback}. Install a C++ compiler and ninja to enable it, or set "
                      f"VIDITQ_KERNELS=torch.", RuntimeWarning, stacklevel=3)
        return None
