"""A per-layer plan searched on one model, mapped onto a deeper and wider model of the same architecture.

The searched W4A8-MP plans that ship with the image pipeline (`reference_models/pixart_digits/viditq_plans`)
were searched on its tiny PixArt transformer (8 blocks, hidden 128). To time them at the size users run
(`pixart_alpha.py`: 28 blocks, hidden 1152), each layer of the big model takes the entry of the source layer
with the same name inside its block (its position in the block: `attn1.to_q`, `attn2.to_k`, `ff.net.2`, ...)
in the block at the same relative depth:

    big block b of B takes source block floor(b * S / B)      (S source blocks)

so source block s serves the big blocks in [s B / S, (s + 1) B / S): the first maps to the first, the last to
the last, and each source block serves B / S big blocks, give or take one (28 over 8: 4, 3, 4, 3, ...).
Rounding instead of flooring would send the last big blocks past the last source block.

Each mapped entry keeps the source entry's recipe (weight / activation bits, group size, symmetry, smoothing
exponent `smooth_alpha`, rotation seed, timestep-wise copy) and takes the big layer's shape and bias. The
group size must divide the big layer's `in_features` and a rotated layer's `in_features` must have a Hadamard
order (1152 and 4608 both do); a mapping that breaks either is refused, naming the layer.

Smoothing factors are not plan data: they come from the layer's weight and per-channel input statistics when
the model is quantized (`recipe.decide_layer`). So a mapped plan with smoothed layers is quantized as a user
would quantize it: `ViDiTQConfig(plan=mapped, calibration=stats)` with `stats` from `viditq_diffusers.calibrate`
on the big model (`speed_cpu.py` calibrates on its benchmark inputs). The alphas are already decided, so no
sampled tokens are needed (`stats.without_samples()`).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace

import torch
from torch import nn

from benchmarks.pixart_alpha import CONFIG
from viditq_diffusers.architectures import default_layers
from viditq_diffusers.jsonio import write_json
from viditq_diffusers.plan import PLAN_VERSION, read_plan
from viditq_diffusers.quant.hadamard import rotatable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_PLANS = {bits: os.path.join(REPO, "reference_models", "pixart_digits", "viditq_plans",
                                    f"w4a8_mp_searched_{bits}bits.json") for bits in (5, 6)}
BLOCK_LAYER = re.compile(r"(?P<blocks>[A-Za-z_]\w*)\.(?P<index>\d+)\.(?P<role>.+)")


def source_block(block: int, blocks: int, source_blocks: int) -> int:
    """The source block whose entries big block `block` (of `blocks`) takes: floor(block * S / B)."""
    return block * source_blocks // blocks


def split_name(name: str) -> tuple[str, int, str]:
    """("transformer_blocks", 3, "attn1.to_q") for "transformer_blocks.3.attn1.to_q"; a ValueError for a layer
    outside the blocks (it has no relative depth to map by)."""
    match = BLOCK_LAYER.fullmatch(name)
    if match is None:
        raise ValueError(f"layer '{name}' is not inside a numbered block list, so it has no block position to map "
                         f"by; plan_mapping maps block layers only.")
    return match["blocks"], int(match["index"]), match["role"]


def source_entry_names(plan: dict) -> dict[tuple[str, str], dict[int, str]]:
    """{(block list, role in block): {block index: source layer name}} of a plan's layers."""
    table: dict[tuple[str, str], dict[int, str]] = {}
    for name in plan["layers"]:
        blocks, index, role = split_name(name)
        table.setdefault((blocks, role), {})[index] = name
    return table


def layer_sources(plan: dict, model: nn.Module) -> dict[str, str]:
    """{layer of `model`: the `plan` layer whose entry it takes} for every default layer of `model`, by role and
    relative block position (module docstring); a ValueError names a layer without a source entry."""
    table = source_entry_names(plan)
    source_blocks = 1 + max(index for entries in table.values() for index in entries)
    names = default_layers(model)
    blocks = 1 + max(split_name(name)[1] for name in names)
    sources = {}
    for name in names:
        block_list, index, role = split_name(name)
        source = table.get((block_list, role), {}).get(source_block(index, blocks, source_blocks))
        if source is None:
            raise ValueError(f"layer '{name}': the source plan has no '{block_list}.N.{role}' entry for block "
                             f"{source_block(index, blocks, source_blocks)} of {source_blocks}; map a plan of the "
                             f"same architecture.")
        sources[name] = source
    return sources


def map_plan(plan: dict, model: nn.Module) -> dict:
    """`plan` (a plan dict with `LayerSpec` entries, e.g. from `read_plan`) mapped onto `model`'s default layers
    (`layer_sources`). Every default layer of `model` gets an entry; a ValueError names a layer without a source
    entry, or one whose recipe does not fit its shape."""
    modules = dict(model.named_modules())
    layers = {}
    for name, source in layer_sources(plan, model).items():
        spec, linear = plan["layers"][source], modules[name]
        if spec.group_size and linear.in_features % spec.group_size:
            raise ValueError(f"layer '{name}': group size {spec.group_size} of '{source}' does not divide its "
                             f"in_features={linear.in_features}.")
        if spec.rotation_seed is not None and not rotatable(linear.in_features):
            raise ValueError(f"layer '{name}': '{source}' is rotated, but in_features={linear.in_features} has no "
                             f"Hadamard order.")
        layers[name] = replace(spec, in_features=linear.in_features, out_features=linear.out_features,
                               bias=linear.bias is not None)
    return {"version": PLAN_VERSION, "model_class": type(model).__name__, "layers": layers}


def meta_model(num_layers: int = CONFIG["num_layers"]) -> nn.Module:
    """The PixArt-alpha-sized transformer on the meta device: its layer names and shapes, no weights."""
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        return PixArtTransformer2DModel(**{**CONFIG, "num_layers": num_layers})


def shipped_plan_mapped(bits: int, model: nn.Module | None = None) -> dict:
    """The shipped `bits`-bit searched W4A8-MP plan (5 or 6) mapped onto `model` (default: the PixArt-alpha-sized
    transformer, `meta_model()`)."""
    if bits not in SHIPPED_PLANS:
        raise ValueError(f"no shipped searched plan for {bits} bits; the shipped ones are {sorted(SHIPPED_PLANS)}.")
    return map_plan(read_plan(SHIPPED_PLANS[bits]), meta_model() if model is None else model)


def layer_shapes(plan: dict) -> dict[str, tuple[int, int]]:
    """{layer name: (K, N)} = (in_features, out_features) of each planned layer, e.g. for a cost model."""
    return {name: (spec.in_features, spec.out_features) for name, spec in plan["layers"].items()}


def pixart_alpha_layer_shapes(num_layers: int = CONFIG["num_layers"]) -> dict[str, tuple[int, int]]:
    """{layer name: (K, N)} of the PixArt-alpha-sized transformer's quantizable layers (the shapes a mapped plan
    runs at)."""
    model = meta_model(num_layers)
    modules = dict(model.named_modules())
    return {name: (modules[name].in_features, modules[name].out_features) for name in default_layers(model)}


def cost_shape_map(plan: dict, model: nn.Module | None = None, image_tokens: int = 512, text_tokens: int = 240
                   ) -> dict[str, list[list[int]]]:
    """The cost model's shape map of a plan searched on the small model: {source layer: [[K, N, M], ...]}, one
    triple per big layer that takes its entry (`layer_sources`), M the rows that big layer sees in one forward
    (`speed_cpu.py`'s batch 2: 2 x 256 image tokens, and 2 x 120 caption tokens for the cross-attention's keys and
    values). A plan searched with it fits the time of the mapped plan on the big model."""
    model = meta_model() if model is None else model
    modules = dict(model.named_modules())
    shapes: dict[str, list[list[int]]] = {name: [] for name in plan["layers"]}
    for name, source in layer_sources(plan, model).items():
        rows = text_tokens if split_name(name)[2] in ("attn2.to_k", "attn2.to_v") else image_tokens
        shapes[source].append([modules[name].in_features, modules[name].out_features, rows])
    unmapped = sorted(name for name, triples in shapes.items() if not triples)
    if unmapped:
        raise ValueError(f"source layers {unmapped[:5]} serve no layer of the big model; map a plan of the same "
                         f"architecture.")
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the shape map that costs the shipped image plans' layers at "
                                                 "the PixArt-alpha-sized transformer's shapes (cost_shape_map).")
    parser.add_argument("out", help="JSON file to write, e.g. /tmp/pixart_alpha_shapes.json")
    parser.add_argument("--bits", type=int, default=5, choices=sorted(SHIPPED_PLANS), help="the source plan's layers")
    args = parser.parse_args()
    write_json(args.out, cost_shape_map(read_plan(SHIPPED_PLANS[args.bits])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
