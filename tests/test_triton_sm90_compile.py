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
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed: the GPU lowering is untested here")
pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")

sys.path.insert(0, str(Path(__file__).parent))
from sm90_compile_worker import CASES  # noqa: E402


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    worker = str(Path(__file__).with_name("sm90_compile_worker.py"))
    run = subprocess.run([sys.executable, worker], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, run.stdout.splitlines())}


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_h100(compiled, case):
    result = compiled[case]
    assert result["error"] is None, result["error"]
    assert result["cubin_bytes"] > 0
    if case.startswith("gemm"):
        assert result["int8_wgmma"], "the GEMM does not use Hopper's int8 tensor cores (wgmma .s8.s8)"
