"""GPU GEMM microbenchmark at DiT shapes: cuBLAS bf16 and `torch._int_mm` vs our Triton W8A8 / W4A8.

For each M x K x N (PixArt, Flux, Wan layer shapes) it times, in one run on one device
(`triton.testing.do_bench`, median ms, L2 flushed between runs):
- bf16: `a @ w.t()` (cuBLAS), the baseline of every ratio;
- int8 `_int_mm`: cuBLASLt int8 x int8 -> int32, no scales (a ceiling for the torch path);
- W8A8 / W4A8 / W4A8 g128 GEMM: our Triton GEMM from int8 activation codes, epilogue included;
- W8A8 / W4A8 +quant: the same plus the fused per-token activation quantization kernel, i.e. what a
  layer costs from a bf16 input to a bf16 output.

    python -m benchmarks.gemm_gpu [--shapes pixart flux wan]
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from viditq_diffusers.kernels.triton_gemm import int_gemm
from viditq_diffusers.kernels.triton_quant import quantize_per_token
from viditq_diffusers.quant.formats import pack_int4, quantize_weight

SHAPES = {  # name -> [(M, K, N)]
    "pixart": [(4096, 1152, 1152), (4096, 1152, 4608), (4096, 4608, 1152)],
    "flux": [(4608, 3072, 12288)],
    "wan": [(32760, 5120, 13824)],
}


def weights(n, k, bits, group=None):
    w = torch.randn(n, k, device="cuda") / k**0.5
    codes, scale, zero = quantize_weight(w, bits, group)
    return (pack_int4(codes) if bits == 4 else codes), scale, zero


def bench_shape(m, k, n):
    """Median ms of each column of the table at one M x K x N."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    xq, xs, rs = quantize_per_token(x)
    w8, w4, w4g = weights(n, k, 8), weights(n, k, 4), weights(n, k, 4, 128)
    a8, b8 = torch.randint(-127, 127, (m, k), device="cuda", dtype=torch.int8), w8[0]
    gemm = lambda wt, bits: int_gemm(xq, xs, rs, wt[0], bits, wt[1], wt[2], bias, torch.bfloat16)  # noqa: E731

    def layer(wt, bits):
        q, s, r = quantize_per_token(x)
        return int_gemm(q, s, r, wt[0], bits, wt[1], wt[2], bias, torch.bfloat16)

    fns = [lambda: x @ w.t(), lambda: torch._int_mm(a8, b8.t()), lambda: gemm(w8, 8), lambda: layer(w8, 8),
           lambda: gemm(w4, 4), lambda: layer(w4, 4), lambda: gemm(w4g, 4)]
    return [do_bench(f, warmup=25, rep=100) for f in fns]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    cols = ["bf16", "_int_mm", "W8A8", "W8A8+quant", "W4A8", "W4A8+quant", "W4A8 g128"]
    print("| M x K x N | " + " | ".join(f"{c} ms" for c in cols) + " | W8A8+quant vs bf16 | W4A8+quant vs bf16 |")
    print("|---" * (len(cols) + 3) + "|")
    for name in args.shapes:
        for m, k, n in SHAPES[name]:
            ms = bench_shape(m, k, n)  # its tensors are freed on return
            print(f"| {m} x {k} x {n} ({name}) | " + " | ".join(f"{t:.4f}" for t in ms)
                  + f" | {ms[0] / ms[3]:.2f}x | {ms[0] / ms[5]:.2f}x |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
