"""Weight bytes of whole pipelines, FP16 against quantized, and the peak RSS while loading one quantized.

Two pipelines, random weights, nothing downloaded:
- PixArt-Sigma-sized, MEASURED: `PixArtSigmaPipeline` with a T5 v1.1 XXL encoder (4.76 B parameters, as
  `benchmarks/pipeline_speed.py` builds it), the PixArt-Sigma 1024 transformer (28 blocks, hidden 1152, ~611 M) and
  an SDXL-VAE-shaped `AutoencoderKL` (the SD VAE's config, PixArt-Sigma's scaling factor). It is written once in
  bf16 to `--cache` the way `save_pretrained` lays a pipeline out, the T5 encoder shard by shard (each shard
  materialized, filled, saved and freed before the next: the whole bf16 encoder, ~9.5 GB, is never in memory).
  A rerun with the same sizes finds the folder and skips building. Each row then loads the pipeline from those
  files in a child process of its own (`DiffusionPipeline.from_pretrained(..., torch_dtype=torch.bfloat16)`, the
  quantized rows with a `PipelineQuantizationConfig`, so every weight is quantized as it is read) and reports the
  components' `get_memory_footprint()` and the child's peak RSS (`ru_maxrss`: imports, loading, everything).
- Flux-sized, COMPUTED: T5-XXL, CLIP-L, the 11.9 B Flux.1 transformer and Flux's VAE built on the meta device
  (no weight materialized); each quantized component's planned `nn.Linear` layers are replaced by empty meta
  `ViDiTQLinear` layers, as a pre-quantized checkpoint is laid out before loading, and the bytes are the same
  `get_memory_footprint()`. The PixArt-Sigma rows are computed that way too, next to their measured bytes: the two
  agree (tests/integration/test_pipeline_memory.py), which is what makes the Flux rows trustworthy.

Rows: FP16 (bf16 weights: the same bytes), the transformer alone W8A8, the whole pipeline W8 (text encoders
W8A16, transformer W8A8) and W4 (text encoders W4A16 group 64, transformer W4A8). The VAE stays in bf16 in every
row. T5's feed-forward output `wo` (a fifth of its block weights) is quantized weight-only in every encoder preset and
computes in the dtype transformers gives it: its activations, which overflow fp16, are never quantized. Goals
(PixArt-Sigma-sized): whole W8 <= 0.55x FP16, whole W4 <= 0.32x, and the peak RSS while loading a quantized row at
most its quantized bytes + 1.5 GB (`viditq_diffusers/load_memory.py` keeps it there). At reduced sizes (the flags
below) the FP-kept VAE and embeddings weigh relatively more: the ratio goals do not hold.

    python -m benchmarks.pipeline_memory [--cache DIR] [--rows fp16 transformer_w8a8 w8 w4]
        [--t5-layers 24] [--t5-width 4096] [--transformer-layers 28] [--transformer-heads 16]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, FluxTransformer2DModel, PixArtSigmaPipeline
from diffusers import PixArtTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from benchmarks.child_process import run_json_child
from benchmarks.pipeline_speed import REFERENCE, SD_VAE, T5_XXL, fill_random
from benchmarks.pixart_alpha import CONFIG as PIXART_ALPHA
from viditq_diffusers import ViDiTQConfig
from viditq_diffusers.convert import resolve_plan, set_submodule
from viditq_diffusers.nn import ViDiTQLinear

DTYPE = torch.bfloat16
GIB = 2**30
# PixArt-alpha's transformer at PixArt-Sigma-XL-2-1024-MS's size (diffusers' convert_pixart_sigma_to_diffusers.py)
PIXART_SIGMA = {**PIXART_ALPHA, "sample_size": 128, "interpolation_scale": 2}
PIXART_SIGMA_VAE = {**SD_VAE, "scaling_factor": 0.13025}  # the SDXL VAE: the SD VAE's shape
# black-forest-labs/FLUX.1-dev's transformer, CLIP-L text encoder and VAE
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
FLUX_VAE = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "scaling_factor": 0.3611, "shift_factor": 0.1159}
W8_ENCODER, W4_ENCODER = ("w8a16", {}), ("w4a16", {"group_size": 64})
# row -> the role of each quantized component -> (preset, extra ViDiTQConfig arguments); unnamed roles stay bf16
ROWS = {
    "fp16": {},
    "transformer_w8a8": {"transformer": ("w8a8", {})},
    "w8": {"encoders": W8_ENCODER, "transformer": ("w8a8", {})},
    "w4": {"encoders": W4_ENCODER, "transformer": ("w4a8", {})},
}
LOADED_ROWS = tuple(ROWS)  # loaded by default; every row is computed
ROW_LABELS = {"fp16": "FP16 (bf16)", "transformer_w8a8": "transformer W8A8",
              "w8": "whole: encoders W8A16 + transformer W8A8", "w4": "whole: encoders W4A16 g64 + transformer W4A8"}
RATIO_GOALS = {"w8": 0.55, "w4": 0.32}  # PixArt-Sigma-sized pipeline, at most x FP16
RSS_HEADROOM = 1.5e9  # load peak RSS at most the quantized bytes + this (1.5 GB, the stricter reading)
SHARD_BYTES = 2 * GIB  # the T5 encoder's safetensors shards, at most (one block more than fits starts a new one)


# ------------------------------------------------------------------------------------------------ sizes


def t5_config(layers: int, width: int) -> T5Config:
    """T5-XXL's encoder config with `layers` layers and d_model `width` (64 per head, d_ff 2.5 x width)."""
    if width % 128:
        raise ValueError(f"--t5-width must be a multiple of 128 (64 per attention head, and group size 64 must "
                         f"divide d_ff = 2.5 x width), got {width}; pass e.g. --t5-width 128")
    config = T5Config(**{**T5_XXL, "num_layers": layers, "d_model": width, "num_heads": width // 64,
                         "d_ff": width * T5_XXL["d_ff"] // T5_XXL["d_model"]})
    config.architectures = ["T5EncoderModel"]
    config.dtype = DTYPE
    return config


def transformer_config(layers: int, heads: int, caption_channels: int) -> dict:
    """The PixArt-Sigma transformer's config with `layers` blocks of `heads` heads (72 wide each)."""
    hidden = heads * PIXART_SIGMA["attention_head_dim"]
    return {**PIXART_SIGMA, "num_layers": layers, "num_attention_heads": heads, "cross_attention_dim": hidden,
            "caption_channels": caption_channels}


def folder_name(args) -> str:
    return (f"pixart_sigma-t5_{args.t5_layers}x{args.t5_width}-transformer_{args.transformer_layers}x"
            f"{args.transformer_heads}-bf16")


# ------------------------------------------------------------------------------------------------ build and save


def save_t5_shard_by_shard(config: T5Config, folder: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """The T5 encoder's bf16 weights as `save_pretrained` would write them (sharded safetensors + index), one
    shard in memory at a time: built on the meta device, each shard's modules materialized, filled, saved, freed."""
    folder.mkdir(parents=True)
    with torch.device("meta"):
        model = T5EncoderModel(config).to(DTYPE)
    # groups of modules, one shard each: the embedding with the final norm, then as many blocks as fit shard_bytes
    layer_bytes = sum(p.numel() for p in model.encoder.block[-1].parameters()) * 2
    per_shard = max(1, shard_bytes // layer_bytes)
    blocks = [f"encoder.block.{i}" for i in range(config.num_layers)]
    groups = [["shared", "encoder.final_layer_norm"]] + [blocks[i:i + per_shard]
                                                         for i in range(0, len(blocks), per_shard)]
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            module = model.get_submodule(name).to_empty(device="cpu")
            fill_random(module, seed=index)
            tensors.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        for name in names:
            model.get_submodule(name).to_empty(device="meta")
        del tensors
        gc.collect()
    config.save_pretrained(folder)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_pipeline_folder(args, folder: Path) -> None:
    """Write the bf16 PixArt-Sigma-sized pipeline to `folder` (built in a sibling folder, renamed when complete,
    so an interrupted build is never taken for a cached one)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t5 = t5_config(args.t5_layers, args.t5_width)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # the transformer is built directly in bf16 (its buffers initialized for real)
    try:
        transformer = PixArtTransformer2DModel(**transformer_config(args.transformer_layers, args.transformer_heads,
                                                                    t5.d_model))
    finally:
        torch.set_default_dtype(default)
    vae = torch.nn.Module.to(AutoencoderKL(**PIXART_SIGMA_VAE), DTYPE)
    pipe = PixArtSigmaPipeline(tokenizer=T5Tokenizer.from_pretrained(REFERENCE / "tokenizer"), text_encoder=None,
                               vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler.from_pretrained(REFERENCE / "scheduler"))
    pipe.save_pretrained(partial)
    del pipe, transformer, vae
    gc.collect()
    save_t5_shard_by_shard(t5, partial / "text_encoder")
    index_path = partial / "model_index.json"
    index = json.loads(index_path.read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(partial, folder)


def cached_pipeline_folder(args) -> Path:
    folder = Path(args.cache).expanduser() / folder_name(args)
    if not folder.is_dir():
        print(f"building the bf16 pipeline in {folder} (once; a rerun with these sizes reuses it)", flush=True)
        start = time.perf_counter()
        build_pipeline_folder(args, folder)
        print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)
    else:
        print(f"using the cached bf16 pipeline in {folder}", flush=True)
    return folder


# ------------------------------------------------------------------------------------------------ bytes


def component_configs(row: str, components: dict[str, str]) -> dict:
    """component name -> ViDiTQConfig for `row`; `components` maps name -> role ('encoders', 'transformer',
    'vae'), which picks the preset."""
    return {name: ViDiTQConfig(ROWS[row][role][0], **ROWS[row][role][1])
            for name, role in components.items() if role in ROWS[row]}


def meta_quantized(model: torch.nn.Module, config: ViDiTQConfig) -> torch.nn.Module:
    """`model` (on the meta device) with its planned layers replaced by empty `ViDiTQLinear` layers, as a
    pre-quantized checkpoint is laid out before its tensors load: its footprint without allocating a byte."""
    plan = resolve_plan(model, copy.deepcopy(config))
    for name, spec in plan["layers"].items():
        set_submodule(model, name, ViDiTQLinear(spec, device="meta", dtype=DTYPE))
    return model


def computed_rows(components: dict[str, tuple[str, torch.nn.Module]], rows) -> dict[str, dict[str, int]]:
    """row -> component -> bytes, from meta models: `components` maps name -> (role, meta model in bf16)."""
    result = {}
    for row in rows:
        configs = component_configs(row, {name: role for name, (role, _) in components.items()})
        result[row] = {}
        for name, (_, model) in components.items():
            laid_out = meta_quantized(copy.deepcopy(model), configs[name]) if name in configs else model
            result[row][name] = laid_out.get_memory_footprint()
    return result


def as_loaded(model: torch.nn.Module) -> torch.nn.Module:
    """A meta model's tensors in the dtypes `from_pretrained(..., torch_dtype=bf16)` gives them: parameters and
    saved buffers in bf16, buffers that are not saved (PixArt's fp32 position embedding) as the model built them."""
    for module in model.modules():
        for name, tensor in module.named_parameters(recurse=False):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(DTYPE)
        for name, tensor in module.named_buffers(recurse=False):
            if tensor.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = tensor.to(DTYPE)
    return model


def pixart_sigma_meta(args) -> dict[str, tuple[str, torch.nn.Module]]:
    t5 = t5_config(args.t5_layers, args.t5_width)
    with torch.device("meta"):
        return {
            "text_encoder": ("encoders", as_loaded(T5EncoderModel(t5))),
            "transformer": ("transformer", as_loaded(PixArtTransformer2DModel(**transformer_config(
                args.transformer_layers, args.transformer_heads, t5.d_model)))),
            "vae": ("vae", as_loaded(AutoencoderKL(**PIXART_SIGMA_VAE))),
        }


def flux_meta() -> dict[str, tuple[str, torch.nn.Module]]:
    with torch.device("meta"):
        return {
            "text_encoder": ("encoders", as_loaded(CLIPTextModel(CLIPTextConfig(**CLIP_L)))),
            "text_encoder_2": ("encoders", as_loaded(T5EncoderModel(T5Config(**T5_XXL)))),
            "transformer": ("transformer", as_loaded(FluxTransformer2DModel(**FLUX_TRANSFORMER))),
            "vae": ("vae", as_loaded(AutoencoderKL(**FLUX_VAE))),
        }


# ------------------------------------------------------------------------------------------------ load (child)


def load_row(folder: Path, row: str) -> dict:
    """Load the cached bf16 pipeline as row `row` asks (quantized as it is read); bytes per component, peak RSS."""
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after the imports
    configs = component_configs(row, {"text_encoder": "encoders", "transformer": "transformer", "vae": "vae"})
    extra = {"quantization_config": PipelineQuantizationConfig(quant_mapping=configs)} if configs else {}
    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=DTYPE, **extra)
    load_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    quantized = {name: sum(isinstance(m, ViDiTQLinear) for m in getattr(pipe, name).modules()) for name in configs}
    return dict(row=row, bytes={name: getattr(pipe, name).get_memory_footprint()
                                for name in ("text_encoder", "transformer", "vae")},
                quantized_layers=quantized, load_s=load_s, peak_rss=peak, import_rss=baseline)


def run_child(args, folder: Path, row: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.pipeline_memory", "--child", row, "--child-folder", str(folder),
               "--threads", str(args.threads)]
    return run_json_child(command, row=row)


# ------------------------------------------------------------------------------------------------ table


def table(pixart: dict, pixart_computed: dict, flux: dict) -> str:
    """Markdown: one line per (pipeline, row), bytes per component in GiB, ratio to FP16, goals met or not."""
    lines = ["| pipeline | row | bytes | text encoder(s) GiB | transformer GiB | VAE GiB | total GiB | x FP16 "
             "| ratio goal | load peak RSS GiB | RSS goal |", "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|"]

    def gib(value: float) -> str:
        return f"{value / GIB:.3f}"

    def line(pipeline: str, row: str, how: str, sizes: dict, fp16_total: int, result: dict | None) -> str:
        total = sum(sizes.values())
        encoders = sum(v for k, v in sizes.items() if k.startswith("text_encoder"))
        ratio = total / fp16_total
        goal = RATIO_GOALS.get(row) if pipeline == "PixArt-Sigma" else None
        goal_text = "-" if goal is None else f"<= {goal:.2f}x: {'met' if ratio <= goal else 'NOT met'}"
        rss = rss_goal = "-"
        if result is not None:
            rss = gib(result["peak_rss"])
            if row != "fp16":
                limit = total + RSS_HEADROOM
                rss_goal = f"<= {gib(limit)}: {'met' if result['peak_rss'] <= limit else 'NOT met'}"
        return (f"| {pipeline} | {ROW_LABELS[row]} | {how} | {gib(encoders)} | {gib(sizes['transformer'])} | "
                f"{gib(sizes['vae'])} | {gib(total)} | {ratio:.3f} | {goal_text} | {rss} | {rss_goal} |")

    fp16 = pixart.get("fp16")
    fp16_measured = sum(fp16["bytes"].values()) if fp16 and "error" not in fp16 else None
    for row in pixart_computed:
        result = pixart.get(row)
        if result is not None and "error" in result:
            lines.append(f"| PixArt-Sigma | {ROW_LABELS[row]} | measured | failed: {result['error']} "
                         f"| | | | | | | |")
        elif result is not None and fp16_measured is not None:
            lines.append(line("PixArt-Sigma", row, "measured", result["bytes"], fp16_measured, result))
        lines.append(line("PixArt-Sigma", row, "computed", pixart_computed[row],
                          sum(pixart_computed["fp16"].values()), None))
    for row, sizes in flux.items():
        lines.append(line("Flux.1", row, "computed", sizes, sum(flux["fp16"].values()), None))
    return "\n".join(lines)


def parameters(components: dict) -> str:
    return ", ".join(f"{name} {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B"
                     for name, (_, model) in components.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="~/.cache/viditq-diffusers/pipeline_memory",
                        help="where the bf16 pipeline is written once and found again")
    parser.add_argument("--rows", nargs="+", default=list(LOADED_ROWS), choices=list(ROWS),
                        help="PixArt-Sigma rows loaded (fp16, the ratios' reference, always is); all are computed")
    parser.add_argument("--t5-layers", type=int, default=T5_XXL["num_layers"], help="T5-XXL encoder layers (24)")
    parser.add_argument("--t5-width", type=int, default=T5_XXL["d_model"], help="T5 d_model (4096), x 128")
    parser.add_argument("--transformer-layers", type=int, default=PIXART_SIGMA["num_layers"], help="blocks (28)")
    parser.add_argument("--transformer-heads", type=int, default=PIXART_SIGMA["num_attention_heads"],
                        help="attention heads of 72 (16: hidden 1152)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)  # one row, result as JSON
    parser.add_argument("--child-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(load_row(Path(args.child_folder), args.child)))
        return

    rows = ["fp16"] + [row for row in args.rows if row != "fp16"]
    pixart_components, flux_components = pixart_sigma_meta(args), flux_meta()
    print(f"PixArt-Sigma-sized pipeline (random weights, bf16 files): {parameters(pixart_components)}")
    print(f"Flux.1-sized pipeline (meta device, computed): {parameters(flux_components)}")
    pixart_computed = computed_rows(pixart_components, list(ROWS))
    flux = computed_rows(flux_components, list(ROWS))
    folder = cached_pipeline_folder(args)
    disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"  {disk / GIB:.2f} GiB on disk; free under {folder.parent}: "
          f"{shutil.disk_usage(folder.parent).free / GIB:.1f} GiB")
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    pixart = {}
    for row in rows:
        pixart[row] = result = run_child(args, folder, row)
        print(f"  {row}: " + (result.get("error") or f"loaded in {result['load_s']:.1f} s, peak RSS "
                                                    f"{result['peak_rss'] / GIB:.2f} GiB (imports "
                                                    f"{result['import_rss'] / GIB:.2f} GiB)"), flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}\n")
    print(table(pixart, pixart_computed, flux))
    mismatched = [row for row, result in pixart.items()
                  if "error" not in result and result["bytes"] != pixart_computed[row]]
    print("\nmeasured bytes == computed bytes for every loaded PixArt-Sigma row: "
          + ("yes" if not mismatched else f"NO ({', '.join(mismatched)})"))
    print(json.dumps({"pixart_sigma": pixart, "pixart_sigma_computed": pixart_computed, "flux_computed": flux}))


if __name__ == "__main__":
    main()
