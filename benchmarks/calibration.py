"""Cost of `viditq_diffusers.calibrate` on a PixArt-alpha-sized transformer: wall time and peak memory.

Builds, in memory, a PixArtAlphaPipeline whose transformer has PixArt-alpha's size (28 layers, hidden 1152,
16 heads, caption_channels 4096; random init) with a tiny T5 (d_model 4096, 1 layer) and a tiny VAE,
then calibrates it on 8 prompts x 20 steps with CFG, and prints one table: model bytes, RSS before the model
was built, RSS after, the peak RSS during calibration (the kernel's peak counter is reset after loading) and
that peak over the start, which the issue bounds at model + 1 GB.

    python -m benchmarks.calibration [--latent 16] [--steps 20] [--prompts 8] [--threads 2]

Latent 16x16 (128 px at the VAE factor 8; 64 tokens per image) keeps the run to minutes on 2 CPU cores;
memory of the statistics does not depend on the resolution (row samples are capped per timestep bucket).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM), so the peak measured next is calibration's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_pipeline(latent: int):
    import diffusers
    from transformers import T5Config, T5EncoderModel

    from viditq_diffusers.testing.zoo import _tiny_t5_tokenizer

    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=8, d_ff=16, num_layers=1, num_heads=1,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=latent * 8).eval()
    transformer = diffusers.PixArtTransformer2DModel(  # PixArt-alpha XL/2 (512 px config, latent given here)
        sample_size=latent, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
        in_channels=4, out_channels=8, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++")
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                         transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from viditq_diffusers import calibrate

    start = rss_bytes()
    pipe = build_pipeline(args.latent)
    model = sum(t.numel() * t.element_size() for m in (pipe.transformer, pipe.text_encoder, pipe.vae)
                for t in list(m.parameters()) + list(m.buffers()))
    loaded = rss_bytes()
    reset = reset_peak_rss()
    prompts = [f"a photo of a {w} cat" for w in ("red", "blue", "small", "fat", "old", "young", "black", "white")]
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    size = args.latent * 8
    t0 = time.time()
    stats = calibrate(pipe, prompts, num_inference_steps=args.steps, guidance_scale=4.5, height=size, width=size,
                      use_resolution_binning=False, clean_caption=False)
    seconds = time.time() - t0
    peak = peak_rss_bytes()
    samples = sum(t.numel() * t.element_size() for t in stats.sample_tokens.values())
    gib = 2**30
    print(f"\nPixArt-alpha-sized pipeline (28 x 1152, random init), {args.prompts} prompts x {args.steps} steps, "
          f"CFG, latent {args.latent}x{args.latent}, {args.threads} threads, {len(stats.layers)} layers hooked\n")
    print("| model (all components) | RSS at start | RSS after load | peak RSS | peak - start | limit (model + 1 GiB) "
          "| stats: row samples | wall time | per step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {model / gib:.2f} GiB | {start / gib:.2f} GiB | {loaded / gib:.2f} GiB | {peak / gib:.2f} GiB | "
          f"{(peak - start) / gib:.2f} GiB | {(model + gib) / gib:.2f} GiB | {samples / gib:.3f} GiB | "
          f"{seconds:.0f} s | "
          f"{seconds / (args.prompts * args.steps):.2f} s |")
    print(f"\npeak - start {'<=' if peak - start <= model + gib else '>'} model + 1 GiB"
          + ("" if reset else "  (peak counter could not be reset: the peak includes building the model)"))


if __name__ == "__main__":
    main()
