"""`viditq` command: quantize, info, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from tqdm.auto import tqdm

from .config import PRESETS, ViDiTQConfig
from .checkpoint import checkpoint_summary, load_any


def cmd_quantize(args) -> None:
    config = ViDiTQConfig(
        preset=args.preset, weight_bits=args.weight_bits, act_bits=args.act_bits, group_size=args.group_size,
        modules_to_not_convert=args.keep_fp, components=args.components,
    )
    from .hub import push_to_hub, save_pretrained

    steps = ["load + quantize", "save"] + (["push"] if args.push else [])
    with tqdm(total=len(steps), desc="viditq quantize", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        obj = load_any(args.src, quantization_config=config)
        bar.update()
        bar.set_postfix_str("save")
        save_pretrained(obj, args.out)
        bar.update()
        if args.push:
            bar.set_postfix_str("push")
            url = push_to_hub(obj, args.push, token=args.token, private=args.private)
            bar.update()
            print(f"pushed: {url}")
    print_summary(checkpoint_summary(args.out), layers=False)


def print_summary(summary: dict, layers: bool) -> None:
    for name, info in summary.items():
        print(f"{name}: {info['model_class']} ({info['num_quantized']} quantized layers)")
        for label, count in sorted(info["formats"].items()):
            print(f"  {label:<12} {count:>5} layers")
        if layers:
            for layer, spec in info["layers"].items():
                group = f"g{spec['group_size']}" if spec["group_size"] else "per-channel"
                print(f"    {layer:<60} W{spec['weight_bits']}A{spec['act_bits']} {group} "
                      f"{spec['in_features']}->{spec['out_features']}")
        print(f"  weight bytes: {info['weight_bytes']:,} (FP16 equivalent {info['fp16_bytes']:,}; "
              f"ratio to FP16 {info['weight_bytes'] / info['fp16_bytes']:.3f}x)")


def cmd_info(args) -> None:
    summary = checkpoint_summary(args.dir)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, layers=args.layers)


def cmd_demo(args) -> None:
    """Quantize a tiny built-in PixArt transformer, print its info and the FP-vs-quantized error."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from .zoo import ZOO, run

    entry = ZOO["PixArtTransformer2DModel"]
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir, q_dir = os.path.join(tmp, "fp"), os.path.join(tmp, args.preset)
        entry.build(seed=0).save_pretrained(fp_dir)
        fp = PixArtTransformer2DModel.from_pretrained(fp_dir)
        quantized = PixArtTransformer2DModel.from_pretrained(fp_dir, quantization_config=ViDiTQConfig(preset=args.preset))
        from .hub import save_pretrained

        save_pretrained(quantized, q_dir)
        print(f"Tiny PixArt transformer quantized to {args.preset} and saved; `viditq info` says:")
        print_summary(checkpoint_summary(q_dir), layers=False)
        print("  (a tiny model: its floating-point embedders, stored in FP32, dominate the bytes; "
              "benchmarks/memory.py measures a PixArt-alpha-sized one)")
        inputs = entry.make_inputs(0)
        with torch.no_grad():
            ref, out = run(fp, inputs).double(), run(quantized, inputs).double()
        rel = ((out - ref).norm() / ref.norm()).item()
        psnr = 10 * torch.log10(ref.abs().max() ** 2 / ((out - ref) ** 2).mean()).item()
        print(f"FP32 vs {args.preset.upper()} output: relative L2 error {rel:.4f}, PSNR {psnr:.1f} dB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viditq", description="ViDiT-Q quantization for diffusers DiTs")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a diffusers model or pipeline directory")
    q.add_argument("src", help="a diffusers model directory (config.json) or pipeline directory (model_index.json)")
    q.add_argument("--preset", default="w8a8", choices=sorted(PRESETS))
    q.add_argument("--weight-bits", type=int)
    q.add_argument("--act-bits", type=int)
    q.add_argument("--group-size", type=int)
    q.add_argument("--keep-fp", nargs="*", default=None, help="extra layer names/patterns to keep in floating point")
    q.add_argument("--components", nargs="+", default=["transformer"], help="pipeline components to quantize")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--push", metavar="REPO_ID", help="also push to the Hugging Face Hub")
    q.add_argument("--token", help="Hub token (default: the logged-in token / HF_TOKEN)")
    q.add_argument("--private", action="store_true")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", help="print the plan summary and weight memory of a quantized checkpoint")
    i.add_argument("dir")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="quantize a tiny built-in PixArt and print its error vs FP")
    d.add_argument("--preset", default="w8a8", choices=sorted(PRESETS))
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"viditq {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
