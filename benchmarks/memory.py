"""Weight memory of the PixArt-alpha 512 transformer (~611M params): FP32, FP16, W8A8, W4A8, W4A8-g64.

Builds the model with random init once per variant (one at a time, to keep peak RAM near 4 GB),
quantizes an FP16 copy with `viditq_diffusers.quantize` (layers kept in floating point stay FP16)
and counts `weight_bytes` (every parameter and buffer as stored). Exits non-zero unless
W8A8 <= 0.52x FP16 and W4A8 <= 0.30x FP16. No accelerator needed.

    python -m benchmarks.memory [--layers 28]
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from benchmarks.pixart_alpha import build
from viditq_diffusers import ViDiTQConfig, fp16_weight_bytes, quantize, weight_bytes

VARIANTS = {  # name -> (dtype, config or None)
    "FP32": (torch.float32, None),
    "FP16": (torch.float16, None),
    "W8A8": (torch.float16, ViDiTQConfig(preset="w8a8")),
    "W4A8": (torch.float16, ViDiTQConfig(preset="w4a8")),
    "W4A8 g64": (torch.float16, ViDiTQConfig(preset="w4a8", group_size=64)),
}
LIMITS = {"W8A8": 0.52, "W4A8": 0.30}  # max ratio to FP16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="transformer blocks (28 = PixArt-alpha)")
    args = parser.parse_args()

    sizes, cross_check = {}, {}
    for name, (dtype, config) in VARIANTS.items():
        model = build(dtype, args.layers)
        if name == "FP32":
            print(f"PixArt-alpha 512 transformer, {args.layers} blocks: "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters")
        if config is not None:
            quantize(model, config)
            cross_check[name] = fp16_weight_bytes(model)
        sizes[name] = weight_bytes(model)
        del model
        gc.collect()

    fp16 = sizes["FP16"]
    print("\n| variant | weight bytes | MiB | ratio to FP16 |\n|---|---:|---:|---:|")
    for name, size in sizes.items():
        print(f"| {name} | {size:,} | {size / 2**20:,.1f} | {size / fp16:.3f}x |")
    print()
    for name, size in cross_check.items():
        status = "OK" if size == fp16 else "MISMATCH"
        print(f"cross-check: fp16_weight_bytes({name} model) = {size:,} vs FP16 {fp16:,}: {status}")

    failures = [f"{name} is {sizes[name] / fp16:.3f}x FP16 (limit {limit:.2f}x)"
                for name, limit in LIMITS.items() if sizes[name] > limit * fp16]
    failures += [f"fp16_weight_bytes({name}) = {size:,} != FP16 bytes {fp16:,}"
                 for name, size in cross_check.items() if size != fp16]
    hint = "" if args.layers == 28 else f" (with --layers {args.layers} the FP-kept embedders weigh more than at 28)"
    assert not failures, "memory check failed: " + "; ".join(failures) + hint
    print("PASS: " + ", ".join(f"{name} <= {limit:.2f}x FP16" for name, limit in LIMITS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
