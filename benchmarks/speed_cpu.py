"""CPU forward latency of the PixArt-alpha 512 transformer: fp32, bf16, W8A8 and W4A8 (torch path).

One forward = batch 2, latent 32x32 (256 image tokens), 120 T5 tokens (4096 channels), timestep [2].
Each variant: 1 warm-up forward, then the median of N timed forwards under `torch.inference_mode()`,
with torch threads = the cores this process may use. W8A8/W4A8 quantize an fp32 model, so activations
are fp32, quantized per token to int8 for the exact integer GEMM (`kernels.int_mm`). Also times one 512x1152x1152 matmul in fp32,
bf16, `torch._int_mm` int8 and our `int_mm`, to show the kernel-level ratio. Prints the CPU's int8-relevant flags.

    python benchmarks/speed_cpu.py [--layers 28] [--repeats 3] [--quant-repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from pixart_alpha import build, inputs
from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.kernels import int_mm

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> str:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    marks = " ".join(f"{f}{'+' if f in flags else '-'}" for f in FLAGS)
    return (f"CPU: {model}, {torch.get_num_threads()} threads; flags: {marks}\n"
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_model(dtype, config, layers: int, repeats: int) -> float:
    model = build(dtype, layers)
    if config is not None:
        quantize(model, config)
    kwargs = inputs(dtype)
    seconds = median_time(lambda: model(**kwargs), repeats)
    del model
    gc.collect()
    return seconds


def time_matmuls(repeats: int) -> dict[str, float]:
    """`x [512, 1152] @ W[1152, 1152]^T` as the layers run it: F.linear (fp32, bf16) and the W8A8 `int_mm`."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 1152, generator=g), torch.randn(1152, 1152, generator=g) / 34
    xb, wb = x.bfloat16(), w.bfloat16()
    x8, w8 = (t.mul(127 / t.abs().max()).round().to(torch.int8) for t in (x, w))
    return {
        "fp32": median_time(lambda: F.linear(x, w), repeats),
        "bf16": median_time(lambda: F.linear(xb, wb), repeats),
        "int8 (torch._int_mm)": median_time(lambda: torch._int_mm(x8, w8.t()), repeats),
        "int8 (our int_mm: exact on fp32 BLAS)": median_time(lambda: int_mm(x8, w8), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="transformer blocks (28 = PixArt-alpha)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards for fp32 / bf16")
    parser.add_argument("--quant-repeats", type=int, default=3, help="timed forwards for W8A8 / W4A8")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(cpu_info())
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    print(f"PixArt-alpha 512 transformer, {args.layers} blocks; batch 2, 256 image tokens, 120 text tokens; "
          f"1 warm-up, median of {args.repeats} (fp32/bf16) and {args.quant_repeats} (W8A8/W4A8) forwards", flush=True)

    variants = {  # name -> (model/activation dtype, config, repeats)
        "fp32 eager": (torch.float32, None, args.repeats),
        "bf16 eager": (torch.bfloat16, None, args.repeats),
        "W8A8 (fp32 acts -> int8, int_mm)": (torch.float32, ViDiTQConfig(preset="w8a8"), args.quant_repeats),
        "W4A8 (fp32 acts -> int8, int_mm)": (torch.float32, ViDiTQConfig(preset="w4a8"), args.quant_repeats),
    }
    results = {}
    with torch.inference_mode():
        kernels = time_matmuls(max(args.repeats, 10))
        for name, (dtype, config, repeats) in variants.items():
            results[name] = time_model(dtype, config, args.layers, repeats)
            print(f"  {name}: {results[name]:.2f} s (load average {os.getloadavg()[0]:.1f})", flush=True)

    print("\n| variant | median s | vs fp32 | vs bf16 |\n|---|---:|---:|---:|")
    fp32, bf16 = results["fp32 eager"], results["bf16 eager"]
    for name, s in results.items():
        print(f"| {name} | {s:.2f} | {s / fp32:.2f}x | {s / bf16:.2f}x |")
    ops = 2 * 512 * 1152 * 1152
    for name, s in kernels.items():
        print(f"| matmul 512x1152x1152 {name}, {ops / s / 1e9:.1f} GOP/s | {s:.4f} | "
              f"{s / kernels['fp32']:.2f}x | {s / kernels['bf16']:.2f}x |")
    print("\n'vs' columns are time ratios (> 1 = slower); matmul rows compare with the fp32 / bf16 matmul.")


if __name__ == "__main__":
    main()
