"""GPU GEMM ceiling at PixArt-alpha shapes: bf16 matmul vs `torch._int_mm` (int8 x int8 -> int32).

Shows what an int8 path can gain once the quantize/dequantize glue is fused (kernels issue).

    python benchmarks/gemm_gpu.py
"""

import torch
from torch.utils.benchmark import Timer


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| M x K x N | bf16 ms | int8 _int_mm ms | int8 speedup | per-token quant glue ms |\n|---|---|---|---|---|")
    for m in (512, 2048, 8192):
        for k, n in ((1152, 1152), (1152, 4608), (4608, 1152)):
            a, b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            a8 = torch.randint(-127, 127, (m, k), device="cuda", dtype=torch.int8)
            b8 = torch.randint(-127, 127, (n, k), device="cuda", dtype=torch.int8)
            t_bf16 = Timer("a @ b.t()", globals=dict(a=a, b=b)).blocked_autorange(min_run_time=0.3).median
            t_int8 = Timer("torch._int_mm(a8, b8.t())", globals=dict(a8=a8, b8=b8, torch=torch)).blocked_autorange(min_run_time=0.3).median
            glue = "s = a.float().abs().amax(1, keepdim=True) / 127; torch.round(a.float() / s).clamp(-128, 127).to(torch.int8)"
            t_glue = Timer(glue, globals=dict(a=a, torch=torch)).blocked_autorange(min_run_time=0.3).median
            print(f"| {m} x {k} x {n} | {t_bf16 * 1e3:.4f} | {t_int8 * 1e3:.4f} | {t_bf16 / t_int8:.2f}x | {t_glue * 1e3:.4f} |")


if __name__ == "__main__":
    main()
