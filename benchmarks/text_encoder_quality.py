"""Text-encoder quantization alone: embedding cosine and relative error vs FP on a T5-shaped encoder with T5-like
activation outliers (SYNTHETIC, `viditq_diffusers.testing.t5_outliers`: random T5-initialised weights, a few hidden
channels k times the typical one in every block's linear inputs).

The encoders shipped with the reference pipelines are tiny and have no outliers; this is the measurement that
shows what each encoder preset costs on a T5-XXL-wide stack. Rows: weight-only W8A16 (the encoders' default),
W4A16 at two group sizes, and W8A8 with dynamic per-token activations (no calibration), once on the outlier model
and once on the same model without outliers (k=1), so the outliers' share of the error is visible.

    python -m benchmarks.text_encoder_quality                      # T5-XXL widths, 2 layers, k=30, 6 channels
    python -m benchmarks.text_encoder_quality --d-model 256 --d-ff 768 --heads 4 --layers 1 --tokens 16  # tiny

Metrics over every token of `--prompts` random prompts of `--tokens` tokens: cosine of all embeddings vs FP and
relative error ||q - fp||^2 / ||fp||^2 (both over the flattened embeddings), and the quantized linears' bytes
vs the same linears in FP16. Compare rows within one table: the outliers also enlarge the attention logits of
a random-weight stack (trained models learn to temper them), so every config's error, weight-only too, is larger
on the outlier model than on k=1; what the outliers hurt MORE is per-token activation quantization.
About 3 GB of memory at the defaults (the FP stack is 1.6 GB in fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.atomic import atomic_path
from viditq_diffusers.convert import quantized_layers
from viditq_diffusers.footprint import fp16_weight_bytes, weight_bytes
from viditq_diffusers.testing.t5_outliers import outlier_t5_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = {
    "W8A16 (encoder default)": dict(preset="w8a16"),
    "W4A16 g128": dict(preset="w4a16", group_size=128),
    "W4A16 g64": dict(preset="w4a16", group_size=64),
    "W8A8 (dynamic per-token, no calibration)": dict(preset="w8a8"),
}


def embedding_metrics(quantized: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Cosine and relative squared error of `quantized` vs `reference` embeddings, both over all elements."""
    q, r = quantized.flatten().double(), reference.flatten().double()
    return {"cosine": float(torch.nn.functional.cosine_similarity(q, r, dim=0)),
            "rel_error": float((q - r).square().sum() / r.square().sum())}


@torch.no_grad()
def encode_quantized(model, config: ViDiTQConfig, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The embeddings of `model` with its planned linears quantized by `config`, and those linears' bytes vs FP16.

    The quantized layers are swapped in and the floating-point ones put back afterwards, so memory holds the FP
    model and one quantized copy of its linears (the same layers `from_pretrained(..., quantization_config=...)`
    builds: tests/integration/test_text_encoders.py checks they are bit-identical)."""
    _, built = quantized_layers(model, copy.deepcopy(config))
    originals = {}
    try:
        for name, layer in built:
            parent, _, leaf = name.rpartition(".")
            originals[name] = getattr(model.get_submodule(parent), leaf)
            setattr(model.get_submodule(parent), leaf, layer)
        layers = [model.get_submodule(name) for name in originals]
        ratio = sum(weight_bytes(m) for m in layers) / sum(fp16_weight_bytes(m) for m in layers)
        return model(input_ids=input_ids)[0], ratio
    finally:
        for name, linear in originals.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear)


@torch.no_grad()
def measure(args, rows: dict | None = None) -> dict:
    """{model label: {row label: {"cosine", "rel_error", "bytes_vs_fp16"}}} for the outlier model and k=1."""
    rows = ROWS if rows is None else rows
    shape = dict(d_model=args.d_model, d_ff=args.d_ff, num_heads=args.heads, d_kv=args.d_model // args.heads,
                 num_layers=args.layers, channels=args.channels, seed=args.seed)
    input_ids = torch.randint(2, 1024, (args.prompts, args.tokens), generator=torch.Generator().manual_seed(1))
    results = {}
    for k in (args.k, 1.0):
        label = f"outliers k={k:g} on {args.channels} channels" if k != 1 else "no outliers (k=1)"
        model = outlier_t5_encoder(k=k, **shape)
        reference = model(input_ids=input_ids)[0]
        results[label] = {}
        for row, kwargs in rows.items():
            t0 = time.time()
            embeddings, ratio = encode_quantized(model, ViDiTQConfig(**kwargs), input_ids)
            results[label][row] = {**embedding_metrics(embeddings, reference), "bytes_vs_fp16": ratio}
            print(f"  {label} / {row}: {time.time() - t0:.0f} s", file=sys.stderr)
        del model
    return results


def print_tables(results: dict, args) -> None:
    print(f"\nT5-shaped encoder (synthetic): d_model {args.d_model}, d_ff {args.d_ff}, {args.heads} heads, "
          f"{args.layers} layers; {args.prompts} prompts x {args.tokens} tokens")
    for label, rows in results.items():
        print(f"\n{label}\n| encoder config | cosine vs FP | rel. error vs FP | quantized linears' bytes / FP16 |")
        print("|---|---:|---:|---:|")
        for row, r in rows.items():
            print(f"| {row} | {r['cosine']:.6f} | {r['rel_error']:.2e} | {r['bytes_vs_fp16']:.3f} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=10240)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--k", type=float, default=30.0, help="outlier factor")
    parser.add_argument("--channels", type=int, default=6, help="outlier channels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "quality", "text-encoder-synthetic.json"),
                        help="JSON of the tables ('' = do not write)")
    args = parser.parse_args(argv)
    if args.d_model % args.heads:
        raise SystemExit(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    torch.set_num_threads(args.threads)
    results = measure(args)
    print_tables(results, args)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
