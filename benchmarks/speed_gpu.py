"""GPU forward time and memory of the PixArt-alpha 512 transformer: bf16 / fp16 eager vs W8A8 / W4A8.

The quantized variants run this version's torch path (per-token quantization in torch ops +
`torch._int_mm`), not fused kernels; the kernels issue replaces it. All variants are timed in
one run on one device (CUDA events, median of `--repeats` after warm-up).

    python benchmarks/speed_gpu.py [--latents 32 64] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from pixart_alpha import build, inputs
from viditq_diffusers import ViDiTQConfig, quantize, weight_bytes


def timed(model, kwargs, repeats):
    with torch.inference_mode():
        model(**kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(**kwargs)[0]
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), torch.cuda.max_memory_allocated(), out.float()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="latent sizes (tokens = (n/2)^2)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    variants = [
        ("bf16 eager", torch.bfloat16, None),
        ("fp16 eager", torch.float16, None),
        ("W8A8 (bf16 acts)", torch.bfloat16, ViDiTQConfig(preset="w8a8")),
        ("W4A8 (bf16 acts)", torch.bfloat16, ViDiTQConfig(preset="w4a8")),
        ("W4A8 g64 (bf16 acts)", torch.bfloat16, ViDiTQConfig(preset="w4a8", group_size=64)),
    ]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for latent in args.latents:
        tokens = (latent // 2) ** 2
        print(f"\nbatch 2, {tokens} image tokens, 120 text tokens")
        print(f"| variant | median s | vs bf16 | weight MiB | peak MiB | rel. L2 vs bf16 |\n|---|---|---|---|---|---|")
        base_time = base_out = None
        for name, dtype, config in variants:
            model = build(dtype).cuda()
            if config is not None:
                quantize(model, config)
            kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs(dtype, latent=latent).items()}
            seconds, peak, out = timed(model, kwargs, args.repeats)
            base_time = base_time or seconds
            base_out = out if base_out is None else base_out
            rel = ((out - base_out).norm() / base_out.norm()).item()
            print(f"| {name} | {seconds:.4f} | {base_time / seconds:.2f}x | {weight_bytes(model) / 2**20:.0f} | "
                  f"{peak / 2**20:.0f} | {rel:.4f} |")
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
