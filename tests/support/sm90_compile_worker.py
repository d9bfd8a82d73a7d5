"""Compile the Triton kernels for an H100 (sm_90) ahead of time and print one JSON line per kernel.

tests/unit/test_triton_sm90_compile.py runs it as `python -m tests.support.sm90_compile_worker` in a process without
`TRITON_INTERPRET` (the interpreter, which the rest of the suite uses, replaces `triton.jit` functions with
ones that cannot be compiled). The kernels and their launch specialisation are `benchmarks/triton_lowering.py`'s:
every dtype, PixArt's and Wan's largest channel counts, and each GEMM weight kind in its first config.
"""

import json

from benchmarks.triton_lowering import gemm_cases, quantization_cases

if __name__ == "__main__":
    for name, build in [*quantization_cases(channels=(1152, 13824)), *gemm_cases(all_configs=False)]:
        try:
            kernel = build()
            result = {"case": name, "error": None, "cubin_bytes": len(kernel.asm["cubin"]),
                      "int8_wgmma": "wgmma.mma_async" in kernel.asm["ptx"] and ".s8.s8" in kernel.asm["ptx"]}
        except Exception as error:  # reported per kernel by the test
            result = {"case": name, "error": f"{type(error).__name__}: {str(error)[-2000:]}"}
        print(json.dumps(result), flush=True)
