"""Seconds per image of a whole PixArt-alpha-sized pipeline on CPU: encode / denoise / decode, and peak RSS.

The pipeline is diffusers' `PixArtAlphaPipeline`, built here with random weights and nothing downloaded:
- text encoder: a T5 v1.1 XXL encoder (d_model 4096, d_ff 10240, 64 heads, gated-gelu, vocab 32128), 24 layers
  (4.76 B parameters) or fewer with `--t5-layers` (d_model stays 4096: the transformer's caption input);
- transformer: `benchmarks/pixart_alpha.py`'s PixArt-alpha 512 transformer (28 blocks, ~611 M parameters);
- VAE: an `AutoencoderKL` with the Stable Diffusion VAE's config (channels 128/256/512/512, 4 latent channels);
- tokenizer and scheduler: those of `reference_models/pixart_digits` (a T5 tokenizer; DPM-Solver++ 2M, the
  scheduler PixArt-alpha ships).

One image per call, classifier-free guidance (guidance 4.5: the transformer runs on batch 2), 20 steps by
default, at 512 x 512 (64 x 64 latent: 32 x 32 patches, 1024 image tokens) and 256 x 256 (256 tokens); 1024 x 1024
(4096 tokens) runs with `--resolution 1024`.

Rows differ only in the transformer (and the VAE's dtype, which follows the transformer's activations):
`fp32`, `bf16`, `w8a8` / `w4a8_mp` (ViDiT-Q presets on the fp32 model: fp32 activations, as the Gradio demo runs
on CPU) and `w8a8_bf16` / `w4a8_mp_bf16` (the same quantized layers in a bf16 model: attention, norms and GELU
in bf16). The text encoder runs in bf16 in every row (`--t5-dtype`): a fp32 T5-XXL alone is 19 GB, which with
the rest does not fit a 24 GB machine; its share of the time is the same in every row. Every prompt is padded
to 120 tokens, and `encode_prompt` runs the encoder twice (prompt and empty negative prompt).

Each row runs in its own child process, so its peak RSS (the child's own `ru_maxrss`: every component
resident, as a plain `pipe(...)` keeps them) is that row's alone. The child builds the transformer, quantizes it
from its fp32 or bf16 weights (timed apart: not part of the time per image), builds the encoder and the VAE,
runs one warm-up image at 64 x 64 with 2 steps and 8 text tokens (C++ kernels loaded, weights packed), then
times one image at the real size. The three stages are timed as they run, one after the other, through the
pipeline's own code: `pipe.encode_prompt`, the pipeline call with those embeddings and `output_type="latent"`
(the denoising loop: transformer and scheduler), then `vae.decode` and the image post-processing. `finite` says
whether the prompt embeddings, the final latents and the decoded image are all finite (random weights must not
give NaN or Inf; a NaN or Inf from the transformer at any step would reach the final latents).

    python -m benchmarks.pipeline_speed [--resolution 256 512] [--steps 20] [--rows fp32 bf16 w8a8_bf16 ...]
        [--t5-layers 24] [--t5-dtype bf16] [--transformer-layers 28] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from benchmarks.child_process import run_json_child
from benchmarks.pixart_alpha import CONFIG, build
from benchmarks.speed_cpu import cpu_info
from viditq_diffusers import ViDiTQConfig, quantize
from viditq_diffusers.kernels import warmup

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "reference_models" / "pixart_digits"
# google/t5-v1_1-xxl's encoder, as PixArt-alpha uses it
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# the Stable Diffusion VAE (PixArt-alpha's)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# row -> (transformer and VAE dtype, ViDiT-Q preset or None)
ROWS = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "w8a8": (torch.float32, "w8a8"),
    "w4a8_mp": (torch.float32, "w4a8_mp"),
    "w8a8_bf16": (torch.bfloat16, "w8a8"),
    "w4a8_mp_bf16": (torch.bfloat16, "w4a8_mp"),
}
DEFAULT_ROWS = ("fp32", "bf16", "w8a8_bf16", "w4a8_mp_bf16")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROMPT = "a small black digit seven, handwritten, on a white background"
GUIDANCE = 4.5
WARMUP_RESOLUTION = 64
WARMUP_STEPS = 2  # PixArtAlphaPipeline takes element [1] of scheduler.step's output at 1 step: DPM-Solver has none
WARMUP_TEXT_TOKENS = 8  # a warm-up encode at the real 120 tokens would cost as much as the measured one
TEXT_TOKENS = 120  # PixArt-alpha's max_sequence_length: every prompt is padded to it


def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights, fast: matrices from a repeated block of N(0, 1) values (its prime length makes every row a
    different slice) scaled by fan_in^-0.5, except embeddings (std 1); vectors (the RMS norms' scales) ones.
    Only finiteness matters here, and this writes 4.76 B values in seconds where `normal_` takes a minute."""
    block = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.data.fill_(1.0)
            continue
        std = 1.0 if isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.Embedding) \
            else param.shape[-1] ** -0.5
        scaled, flat = (block * std).to(param.dtype), param.data.view(-1)
        repeats = flat.numel() // len(scaled)
        flat[:repeats * len(scaled)].view(repeats, len(scaled)).copy_(scaled.expand(repeats, -1))
        flat[repeats * len(scaled):].copy_(scaled[:flat.numel() - repeats * len(scaled)])


def build_t5_encoder(layers: int, dtype: torch.dtype) -> T5EncoderModel:
    """The T5-XXL encoder with `layers` layers, allocated directly in `dtype` (built on the meta device, so no
    fp32 copy of 19 GB is ever made) and filled by `fill_random`."""
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**{**T5_XXL, "num_layers": layers}))
    model = model.to(dtype).to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the shared embedding and the encoder's its own storage each
    fill_random(model)
    return model.eval().requires_grad_(False)


def t5_parameters(layers: int) -> int:
    """The encoder's parameter count: embedding, per layer (attention, gated FFN, two norms), relative position
    bias (first layer), final norm."""
    d, ff = T5_XXL["d_model"], T5_XXL["d_ff"]
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    bias = T5_XXL["relative_attention_num_buckets"] * T5_XXL["num_heads"]
    return T5_XXL["vocab_size"] * d + layers * per_layer + bias + d


def build_pipeline(dtype: torch.dtype, transformer, t5_layers: int, t5_dtype: torch.dtype) -> PixArtAlphaPipeline:
    torch.manual_seed(0)
    vae = torch.nn.Module.to(AutoencoderKL(**SD_VAE), dtype).eval().requires_grad_(False)
    return PixArtAlphaPipeline(
        tokenizer=T5Tokenizer.from_pretrained(REFERENCE / "tokenizer"),
        text_encoder=build_t5_encoder(t5_layers, t5_dtype), vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(REFERENCE / "scheduler"))


@torch.inference_mode()
def generate(pipe: PixArtAlphaPipeline, resolution: int, steps: int, text_tokens: int = TEXT_TOKENS,
             seed: int = 0) -> dict:
    """One image, CFG, the three stages timed in turn; seconds per stage and whether each output is finite."""
    dtype = pipe.transformer.dtype
    start = time.perf_counter()
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=True, negative_prompt="", device=torch.device("cpu"),
        clean_caption=False, max_sequence_length=text_tokens)
    encoded = time.perf_counter()
    # A view without the encoder: the call then keeps the embeddings in the transformer's dtype (with the encoder
    # it would cast them back to the encoder's).
    denoiser = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                                   scheduler=pipe.scheduler)
    denoiser.set_progress_bar_config(disable=True)
    latents = denoiser(
        prompt_embeds=embeds.to(dtype), prompt_attention_mask=mask, negative_prompt=None,
        negative_prompt_embeds=negative.to(dtype),
        negative_prompt_attention_mask=negative_mask, num_inference_steps=steps, guidance_scale=GUIDANCE,
        height=resolution, width=resolution, use_resolution_binning=False, output_type="latent",
        generator=torch.Generator().manual_seed(seed), return_dict=False)[0]
    denoised = time.perf_counter()
    image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    finite = {"embeddings": bool(torch.isfinite(embeds).all() and torch.isfinite(negative).all()),
              "latents": bool(torch.isfinite(latents).all()), "image": bool(torch.isfinite(image).all())}
    pipe.image_processor.postprocess(image, output_type="pil")
    decoded = time.perf_counter()
    return dict(encode_s=encoded - start, denoise_s=denoised - encoded, decode_s=decoded - denoised,
                total_s=decoded - start, finite=finite, image_shape=list(image.shape))


def run_row(row: str, resolution: int, steps: int, t5_layers: int = 24, t5_dtype: str = "bf16",
            transformer_layers: int = 28) -> dict:
    """Build, quantize (timed), warm up and time one image of row `row`; the result as a JSON-able dict."""
    dtype, preset = ROWS[row]
    start = time.perf_counter()
    transformer = build(dtype, transformer_layers)
    built = time.perf_counter()
    if preset is not None:
        quantize(transformer, ViDiTQConfig(preset=preset))
    quantized = time.perf_counter()
    pipe = build_pipeline(dtype, transformer, t5_layers, DTYPES[t5_dtype])
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter()
    generate(pipe, WARMUP_RESOLUTION, WARMUP_STEPS, WARMUP_TEXT_TOKENS)
    warmed = time.perf_counter()
    result = generate(pipe, resolution, steps)
    return dict(row=row, resolution=resolution, steps=steps, **result,
                build_s=built - start + ready - quantized, quantize_s=quantized - built if preset else None,
                warmup_s=warmed - ready, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def row_label(row: str) -> str:
    dtype, preset = ROWS[row]
    if preset is None:
        return f"{row} eager"
    name = {"w8a8": "W8A8", "w4a8_mp": "W4A8-MP"}[preset]
    return f"ViDiT-Q {name} ({'bf16' if dtype == torch.bfloat16 else 'fp32'} activations)"


def table(results: list[dict]) -> str:
    """Markdown table; a failed row (a dict with 'error') keeps its place with the reason."""
    lines = ["| row | px | encode s | denoise s | decode s | s / image | s / step | peak RSS GiB | quantize s "
             "| finite |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {row_label(r['row'])} | {r['resolution']} | failed: {r['error']} | | | | | | | |")
            continue
        quantize_s = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        bad = [name for name, ok in r["finite"].items() if not ok]
        lines.append(f"| {row_label(r['row'])} | {r['resolution']} | {r['encode_s']:.1f} | {r['denoise_s']:.1f} | "
                     f"{r['decode_s']:.1f} | {r['total_s']:.1f} | {r['denoise_s'] / r['steps']:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | {quantize_s} | {'yes' if not bad else 'NO: ' + ', '.join(bad)} |")
    return "\n".join(lines)


def run_child(args, row: str, resolution: int) -> dict:
    """One row in its own process (its peak RSS is its own); its last stdout line is the result as JSON."""
    command = [sys.executable, "-m", "benchmarks.pipeline_speed", "--child", row, "--resolution", str(resolution),
               "--steps", str(args.steps), "--t5-layers", str(args.t5_layers), "--t5-dtype", args.t5_dtype,
               "--transformer-layers", str(args.transformer_layers), "--threads", str(args.threads)]
    return run_json_child(command, row=row, resolution=resolution)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512], help="image side, pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS))
    parser.add_argument("--t5-layers", type=int, default=T5_XXL["num_layers"], help="T5-XXL encoder layers (24)")
    parser.add_argument("--t5-dtype", default="bf16", choices=list(DTYPES), help="text encoder dtype, every row")
    parser.add_argument("--transformer-layers", type=int, default=CONFIG["num_layers"], help="28 = PixArt-alpha")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)  # one row, result as JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warmup()  # the C++ kernels, built or loaded before anything is timed
    if args.child:
        result = run_row(args.child, args.resolution[0], args.steps, args.t5_layers, args.t5_dtype,
                         args.transformer_layers)
        print(json.dumps(result))
        return

    print(cpu_info())
    print(f"PixArtAlphaPipeline, random weights; 1 image, CFG {GUIDANCE} (transformer batch 2), {args.steps} steps; "
          f"text encoder: T5-XXL encoder, {args.t5_layers} of 24 layers "
          f"({t5_parameters(args.t5_layers) / 1e9:.2f} B parameters), "
          f"{args.t5_dtype} in every row; transformer: PixArt-alpha, {args.transformer_layers} blocks; VAE: SD VAE "
          f"in the row's dtype. One child process per row; one 64 px 2-step warm-up image, then one timed image. "
          f"Image tokens = (px / 16)^2: {', '.join(f'{r} px {(r // 16) ** 2}' for r in args.resolution)}.")
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for resolution in args.resolution:
        for row in args.rows:
            results.append(run_child(args, row, resolution))
            print(f"  {row} at {resolution} px: " + (results[-1].get("error") or f"{results[-1]['total_s']:.1f} s"),
                  flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}\n")
    print(table(results))


if __name__ == "__main__":
    main()
