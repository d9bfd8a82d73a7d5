"""How the Triton kernels lower for an H100 (sm_90), without a GPU: registers and spills per config.

Triton's NVIDIA backend and its bundled `ptxas` compile ahead of time for a named target on any machine.
This compiles every kernel the dispatch can launch at the DiT channel counts (quantization, plain and
rotated; the GEMM in each autotune config for W8, W4 and W4 g128) and prints, from `ptxas -v`, the
registers per thread and the bytes spilled to local memory: spills in an inner loop cost more than the
tensor cores save, so a config that spills is one autotuning should not need. Arguments are specialised as a
real launch would (pointers and the dimensions that are multiples of 16 marked divisible by 16), which is
what lets the GEMM's loads become asynchronous copies. `tests/unit/test_triton_sm90_compile.py` compiles the
same kernels in the suite.

    python -m benchmarks.triton_lowering      (needs Triton with its NVIDIA backend and no TRITON_INTERPRET; no GPU)
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

CHANNELS = (1152, 3072, 4608, 5120, 13824)  # PixArt, Flux, PixArt's ff inner, Wan, Wan's ff inner
DTYPES = ("bf16", "fp16", "fp32")
GEMM_KINDS = ((False, 0, True), (False, 0, False), (True, 0, True), (True, 128, True))  # (W4, group, zero points)
QUANT_DIVISIBLE = ("x_ptr", "smooth_ptr", "sign_ptr", "dense_ptr", "codes_ptr", "scale_ptr", "rowsum_ptr",
                   "K", "stride_x", "stride_c")
GEMM_DIVISIBLE = ("a_ptr", "b_ptr", "c_ptr", "xs_ptr", "ws_ptr", "zero_ptr", "rowsum_ptr", "bias_ptr",
                  "M", "N", "K", "stride_am", "stride_bn", "stride_cm")


def compile_for_h100(fn, signature: dict, constexprs: dict, divisible: tuple, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in divisible}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def quantization_cases(dtypes=DTYPES, channels=CHANNELS):
    """`(name, thunk)`: the plain and the rotated quantization kernel, launched as `quantize_per_token` would."""
    import torch
    import triton

    from viditq_diffusers.kernels import triton_quant
    from viditq_diffusers.quant.hadamard import rotation_factors

    for dtype in dtypes:
        for k in channels:
            block = triton.next_power_of_2(k)
            signature = {"x_ptr": f"*{dtype}", "smooth_ptr": "*fp32", "codes_ptr": "*i8", "scale_ptr": "*fp32",
                         "rowsum_ptr": "*i32", "K": "i32", "stride_x": "i32", "stride_c": "i32"}
            yield f"quantize {dtype} K={k}", lambda s=signature, b=block: compile_for_h100(
                triton_quant._quantize_rows, s, {"QMAX": 127, "HAS_SMOOTH": True, "BLOCK": b}, QUANT_DIVISIBLE,
                num_warps=min(max(b // 256, 1), 16))
            pow2 = rotation_factors(k, 0, torch.float32, "cpu")[0]
            p, p_block = k // pow2, triton.next_power_of_2(k // pow2)
            signature = {"x_ptr": f"*{dtype}", "smooth_ptr": "*fp32", "sign_ptr": f"*{dtype}", "dense_ptr": "*fp32",
                         "codes_ptr": "*i8", "scale_ptr": "*fp32", "rowsum_ptr": "*i32", "stride_x": "i32",
                         "stride_c": "i32"}
            constexprs = {"QMAX": 127, "HAS_SMOOTH": True, "P": p, "P_BLOCK": p_block, "POW2": pow2,
                          "LOG2": pow2.bit_length() - 1}
            warps = min(max(p_block * pow2 // 256, 1), 16)
            yield f"rotate+quantize {dtype} K={k} ({p} x {pow2})", lambda s=signature, c=constexprs, w=warps: \
                compile_for_h100(triton_quant._quantize_rotated_rows, s, c, QUANT_DIVISIBLE, num_warps=w)


def gemm_cases(kinds=GEMM_KINDS, all_configs: bool = True):
    """`(name, thunk)`: the GEMM per weight kind, in every autotune config (or only the first)."""
    from viditq_diffusers.kernels import triton_gemm

    configs = triton_gemm._configs() if all_configs else triton_gemm._configs()[:1]
    for w4, group, zero in kinds:
        signature = {"a_ptr": "*i8", "b_ptr": "*u8" if w4 else "*i8", "c_ptr": "*bf16", "xs_ptr": "*fp32",
                     "ws_ptr": "*fp32", "zero_ptr": "*i8", "rowsum_ptr": "*i32", "bias_ptr": "*bf16", "M": "i32",
                     "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32",
                     "stride_wn": "i32", "stride_zn": "i32"}
        kind = f"{'W4' if w4 else 'W8'}{f' g{group}' if group else ''}{'' if zero else ' symmetric'}"
        for config in configs:
            b = config.kwargs
            constexprs = {"GROUP_SIZE": group, "W4": w4, "HAS_ZERO": zero, "HAS_BIAS": True, **b}
            name = (f"GEMM {kind} {b['BLOCK_M']}x{b['BLOCK_N']}x{b['BLOCK_K']} "
                    f"w{config.num_warps} s{config.num_stages}")
            yield name, lambda s=signature, c=constexprs, cf=config: compile_for_h100(
                triton_gemm._int_gemm.fn, s, c, GEMM_DIVISIBLE, num_warps=cf.num_warps,
                num_stages=cf.num_stages, enable_fp_fusion=False)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) that `ptxas -v` reports for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.findall(r"Used (\d+) registers", report)[-1])
    spills = int(re.findall(r"(\d+) bytes spill stores", report)[-1])
    return registers, spills


def main() -> None:
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    print(f"Triton {triton.__version__}, target sm_90 (H100/H200), ptxas -v")
    print("| kernel | registers / thread | spill stores (bytes) | int8 wgmma |")
    print("|---|---:|---:|---|")
    for name, build in [*quantization_cases(), *gemm_cases()]:
        kernel = build()
        registers, spills = ptxas_usage(kernel.asm["ptx"])
        wgmma = ("yes" if ".s8.s8" in kernel.asm["ptx"] else "no") if name.startswith("GEMM") else ""
        print(f"| {name} | {registers} | {spills} | {wgmma} |", flush=True)


if __name__ == "__main__":
    main()
