"""The Triton kernels lower to an H100 binary (sm_90: PTX, then `ptxas` to a cubin), without a GPU.

`test_triton_kernels.py` checks what the kernels compute, in Triton's CPU interpreter, which lowers nothing:
a kernel can pass there and still fail to compile for a GPU (a reshape or a layout the backend rejects).
Triton's NVIDIA backend and its bundled `ptxas` compile ahead of time for a named target, so this runs on any
machine (`sm90_compile_worker.py`, in a process without the interpreter).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO

pytest.importorskip("triton", reason="Triton is not installed: the GPU lowering is untested here")
pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")


@pytest.mark.slow
def test_every_kernel_compiles_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.support.sm90_compile_worker"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    names = [r["case"] for r in results]
    assert sum(n.startswith("quantize ") for n in names) == 6 and sum(n.startswith("rotate") for n in names) == 6
    assert sum(n.startswith("GEMM") for n in names) == 4
    failed = {r["case"]: r["error"] for r in results if r["error"] is not None}
    assert not failed, "\n".join(f"{name}: {error}" for name, error in failed.items())
    assert all(r["cubin_bytes"] > 0 for r in results)
    no_tensor_cores = [r["case"] for r in results if r["case"].startswith("GEMM") and not r["int8_wgmma"]]
    assert not no_tensor_cores, f"not on Hopper's int8 tensor cores (wgmma .s8.s8): {no_tensor_cores}"
