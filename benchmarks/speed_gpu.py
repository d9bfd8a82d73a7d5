"""GPU forward time and memory of the PixArt-alpha transformer: bf16 / fp16 (eager, optionally compiled) vs
W8A8 / W4A8, on the fused Triton path and on the torch path (`VIDITQ_KERNELS=torch`).

Our quantized models are never compiled here. All variants are timed in one run on one device (CUDA events,
median of `--repeats` after warm-up). Latent 128 is the PixArt-Sigma 1024px token count (4096).

    python -m benchmarks.speed_gpu [--latents 32 64 128] [--repeats 10] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from benchmarks.pixart_alpha import build, inputs
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
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64, 128], help="latent sizes (tokens = (n/2)^2)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd bf16 baseline")
    parser.add_argument("--torch-path", action="store_true", help="add W8A8 / W4A8 on the torch path")
    args = parser.parse_args()
    variants = [  # (name, dtype, config, kernels, compiled)
        ("bf16 eager", torch.bfloat16, None, "auto", False),
        ("fp16 eager", torch.float16, None, "auto", False),
        ("W8A8 Triton (bf16 acts)", torch.bfloat16, ViDiTQConfig(preset="w8a8"), "auto", False),
        ("W4A8 Triton (bf16 acts)", torch.bfloat16, ViDiTQConfig(preset="w4a8"), "auto", False),
        ("W4A8 g64 Triton (bf16 acts)", torch.bfloat16, ViDiTQConfig(preset="w4a8", group_size=64), "auto", False),
    ]
    if args.compile:
        variants.insert(2, ("bf16 compiled", torch.bfloat16, None, "auto", True))
    if args.torch_path:
        variants += [("W8A8 torch path", torch.bfloat16, ViDiTQConfig(preset="w8a8"), "torch", False),
                     ("W4A8 torch path", torch.bfloat16, ViDiTQConfig(preset="w4a8"), "torch", False)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for latent in args.latents:
        tokens = (latent // 2) ** 2
        print(f"\nbatch 2, {tokens} image tokens, 120 text tokens")
        print("| variant | median s | vs bf16 | weight MiB | peak MiB | rel. L2 vs bf16 |\n|---|---|---|---|---|---|")
        base_time = base_out = None
        for name, dtype, config, kernels, compiled in variants:
            os.environ["VIDITQ_KERNELS"] = kernels
            model = build(dtype).cuda()
            if config is not None:
                quantize(model, config)
            if compiled:
                model = torch.compile(model)
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
