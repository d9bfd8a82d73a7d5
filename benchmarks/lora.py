"""CPU latency of an unfused LoRA on the W8A8 PixArt-alpha 512 transformer: with vs without, side by side.

The transformer and inputs are `pixart_alpha.build` / `inputs` (28 blocks, batch 2 = CFG, 256 image tokens,
120 T5 tokens), quantized to ViDiT-Q W8A8 (no calibration, as `speed_cpu.py`). A rank-`--rank` LoRA (PEFT,
random A and B) goes on every quantized linear through PEFT's own injection (`inject_adapter_in_model`
resolves them to `ViDiTQLoraLinear`). The two variants are the same model with the adapter layers disabled
(diffusers' `disable_lora`: the base layer alone) and enabled, timed alternately in one run so that a
shared CPU's changing load hits both alike: 1 warm-up each, then `--repeats` rounds of (without, with).
The table gives the median of each and the median of the per-round ratios. The LoRA branch's share of the
multiply-adds is printed too (what the overhead would be if the fp32 branch ran as fast per FLOP as the rest).

    OMP_NUM_THREADS=1 python -m benchmarks.lora [--layers 28] [--rank 16] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from diffusers.utils.peft_utils import set_adapter_layers
from peft import LoraConfig, inject_adapter_in_model

from benchmarks.pixart_alpha import build, inputs
from benchmarks.speed_cpu import cpu_info
from viditq_diffusers import ViDiTQConfig, ViDiTQLinear, quantize
from viditq_diffusers.lora import ViDiTQLoraLinear


def add_lora(model: torch.nn.Module, rank: int, seed: int = 0) -> list[str]:
    """A rank-`rank` LoRA with random A and B (B = 0 would be just as slow, but check nothing) on every
    quantized linear; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, ViDiTQLinear)]
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights="gaussian"),
                            model, adapter_name="bench")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ViDiTQLoraLinear):
                m.lora_B["bench"].weight.normal_(0, 0.01)
    assert sum(isinstance(m, ViDiTQLoraLinear) for m in model.modules()) == len(names)
    return names


def lora_macs_share(model: torch.nn.Module, rank: int, kwargs: dict) -> float:
    """Multiply-adds of the LoRA branches / those of the quantized linears, for one forward on `kwargs`."""
    rows: dict[str, int] = {}
    hooks = [m.register_forward_hook(
                 lambda mod, args, out, name=name: rows.__setitem__(name, args[0].numel() // args[0].shape[-1]))
             for name, m in model.named_modules() if isinstance(m, ViDiTQLinear)]
    with torch.inference_mode():
        model(**kwargs)
    for h in hooks:
        h.remove()
    base = lora = 0
    for name, m in model.named_modules():
        if isinstance(m, ViDiTQLinear):
            base += rows[name] * m.in_features * m.out_features
            lora += rows[name] * rank * (m.in_features + m.out_features)
    return lora / base


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="transformer blocks (28 = PixArt-alpha)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of (without, with)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_info())
    print(f"load average at start: {os.getloadavg()[0]:.1f}")

    kwargs = inputs(torch.float32)
    model = quantize(build(torch.float32, args.layers), ViDiTQConfig(preset="w8a8"))
    names = add_lora(model, args.rank)
    share = lora_macs_share(model, args.rank, kwargs)
    print(f"PixArt-alpha 512 transformer, {args.layers} blocks, W8A8; LoRA rank {args.rank} on {len(names)} quantized "
          f"linears (unfused, fp32); batch 2, 256 image tokens, 120 text tokens; 1 warm-up each, {args.repeats} "
          f"alternating rounds", flush=True)

    def forward(enabled: bool):
        set_adapter_layers(model, enabled=enabled)
        return model(**kwargs)[0]

    with torch.inference_mode():
        out = {enabled: forward(enabled) for enabled in (False, True)}  # warm-up, and the outputs to compare
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for enabled in (False, True):
                times[enabled].append(timed(lambda: forward(enabled)))
            print(f"  without {times[False][-1]:.2f} s, with {times[True][-1]:.2f} s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    ratios = [w / wo for wo, w in zip(times[False], times[True])]
    change = ((out[True] - out[False]).norm() / out[False].norm()).item()

    print("\n| variant | median s | vs W8A8 |")
    print("|---|---:|---:|")
    print(f"| ViDiT-Q W8A8 | {statistics.median(times[False]):.2f} | 1.00x |")
    print(f"| ViDiT-Q W8A8 + unfused LoRA rank {args.rank} | {statistics.median(times[True]):.2f} | "
          f"{statistics.median(ratios):.3f}x |")
    print(f"\nLoRA overhead: {100 * (statistics.median(ratios) - 1):+.1f}% (median of per-round ratios "
          f"{', '.join(f'{r:.3f}' for r in ratios)}); the branch is {100 * share:.1f}% of the quantized linears' "
          f"multiply-adds; it changes the output by {100 * change:.1f}% (relative L2)")


if __name__ == "__main__":
    main()
