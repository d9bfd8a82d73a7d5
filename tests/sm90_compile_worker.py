"""Compile the Triton kernels for an H100 (sm_90) ahead of time and print one JSON line per case.

tests/test_triton_sm90_compile.py runs it as `python tests/sm90_compile_worker.py` in a process without
`TRITON_INTERPRET` (the interpreter, which the rest of the suite uses, replaces `triton.jit` functions with
ones that cannot be compiled). Arguments are specialised as a real launch would: pointers and the integers
that are multiples of 16 are marked divisible by 16, which is what lets the GEMM's loads become
asynchronous copies.
"""

import json

QUANT_CASES = [(dtype, p, pow2) for dtype in ("bf16", "fp16", "fp32")
               for p, pow2 in ((1, 1024), (36, 32), (108, 128))]  # 1024; PixArt's 1152; Wan's 13824
GEMM_CASES = [(False, 0), (True, 0), (True, 128)]  # (W4, group size)
CASES = ([f"quantize-{dtype}" for dtype in ("bf16", "fp16", "fp32")]
         + [f"rotate-{dtype}-{p}x{pow2}" for dtype, p, pow2 in QUANT_CASES]
         + [f"gemm-{'w4' if w4 else 'w8'}-g{group}" for w4, group in GEMM_CASES])
QUANT_DIVISIBLE = ("x_ptr", "smooth_ptr", "sign_ptr", "dense_ptr", "codes_ptr", "scale_ptr", "rowsum_ptr",
                   "K", "stride_x", "stride_c")
GEMM_DIVISIBLE = ("a_ptr", "b_ptr", "c_ptr", "xs_ptr", "ws_ptr", "zero_ptr", "rowsum_ptr", "bias_ptr",
                  "M", "N", "K", "stride_am", "stride_bn", "stride_cm")


def compile_for_h100(fn, signature, constexprs, divisible, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in divisible}
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def kernels():
    """(case name, thunk compiling it) in CASES order."""
    import triton

    from viditq_diffusers.kernels import triton_gemm, triton_quant

    for dtype in ("bf16", "fp16", "fp32"):
        signature = {"x_ptr": f"*{dtype}", "smooth_ptr": "*fp32", "codes_ptr": "*i8", "scale_ptr": "*fp32",
                     "rowsum_ptr": "*i32", "K": "i32", "stride_x": "i32", "stride_c": "i32"}
        yield f"quantize-{dtype}", lambda s=signature: compile_for_h100(
            triton_quant._quantize_rows, s, {"QMAX": 127, "HAS_SMOOTH": True, "BLOCK": 2048}, QUANT_DIVISIBLE,
            num_warps=8)
    for dtype, p, pow2 in QUANT_CASES:
        p_block = triton.next_power_of_2(p)
        signature = {"x_ptr": f"*{dtype}", "smooth_ptr": "*fp32", "sign_ptr": f"*{dtype}", "dense_ptr": "*fp32",
                     "codes_ptr": "*i8", "scale_ptr": "*fp32", "rowsum_ptr": "*i32", "stride_x": "i32",
                     "stride_c": "i32"}
        constexprs = {"QMAX": 127, "HAS_SMOOTH": True, "P": p, "P_BLOCK": p_block, "POW2": pow2,
                      "LOG2": pow2.bit_length() - 1}
        yield f"rotate-{dtype}-{p}x{pow2}", lambda s=signature, c=constexprs, w=min(max(p_block * pow2 // 256, 1), 16): \
            compile_for_h100(triton_quant._quantize_rotated_rows, s, c, QUANT_DIVISIBLE, num_warps=w)
    for w4, group in GEMM_CASES:
        signature = {"a_ptr": "*i8", "b_ptr": "*u8" if w4 else "*i8", "c_ptr": "*bf16", "xs_ptr": "*fp32",
                     "ws_ptr": "*fp32", "zero_ptr": "*i8", "rowsum_ptr": "*i32", "bias_ptr": "*bf16", "M": "i32",
                     "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32",
                     "stride_wn": "i32", "stride_zn": "i32"}
        constexprs = {"GROUP_SIZE": group, "W4": w4, "HAS_ZERO": True, "HAS_BIAS": True,
                      "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}  # the first autotune config
        yield f"gemm-{'w4' if w4 else 'w8'}-g{group}", lambda s=signature, c=constexprs: compile_for_h100(
            triton_gemm._int_gemm.fn, s, c, GEMM_DIVISIBLE, num_warps=8, num_stages=3, enable_fp_fusion=False)


if __name__ == "__main__":
    for name, build in kernels():
        try:
            kernel = build()
            result = {"case": name, "error": None, "cubin_bytes": len(kernel.asm["cubin"]),
                      "int8_wgmma": "wgmma.mma_async" in kernel.asm["ptx"] and ".s8.s8" in kernel.asm["ptx"]}
        except Exception as error:  # reported per case by the test
            result = {"case": name, "error": f"{type(error).__name__}: {str(error)[-2000:]}"}
        print(json.dumps(result), flush=True)
