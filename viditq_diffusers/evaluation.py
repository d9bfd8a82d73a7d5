"""The quality harness: generate with FP and quantized pipelines from identical noise, compare.

`generate` fixes the noise per sample (one generator per prompt, seeded), so the FP and the
quantized pipeline start from the same latents and any difference is the quantization's.
`epsilon_error` teacher-forces the quantized denoiser along the FP trajectory: at every step it
sees exactly the FP denoiser's inputs, so the error does not compound and adds up across layers.
"""

from __future__ import annotations

import torch

from . import metrics


def denoiser_output(output) -> torch.Tensor:
    """The prediction tensor of a diffusers denoiser's forward (a tuple with return_dict=False, else `.sample`)."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_transformer(pipe, transformer):
    """A copy of `pipe` with another transformer (e.g. a quantized one), progress bars off."""
    new = type(pipe)(**{**pipe.components, "transformer": transformer})
    new.set_progress_bar_config(disable=True)
    return new


def generate(pipe, prompts: list[str], seeds: list[int], **call) -> torch.Tensor:
    """Samples in [-1, 1] (`[N, C, H, W]`, or `[N, F, C, H, W]` for video), one seeded generator per prompt.

    `LattePipeline` is called one prompt at a time: with several prompts it pads the text to 120 tokens and
    zeroes the padding, while with one it cuts the text to its length, so batching would change the samples."""
    per_call = 1 if type(pipe).__name__ == "LattePipeline" else max(len(prompts), 1)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(prompts), per_call):
            generators = [torch.Generator().manual_seed(seed) for seed in seeds[start:start + per_call]]
            out = pipe(prompt=prompts[start:start + per_call], generator=generators, output_type="pt", **call)
            chunks.append(out.frames if hasattr(out, "frames") else out.images)
    return torch.cat(chunks).float() * 2 - 1


@torch.no_grad()
def epsilon_error(fp_pipe, quantized_denoiser, prompts: list[str], seeds: list[int], **call) -> float:
    """Relative MSE of the quantized denoiser's output vs FP, on the FP trajectory's inputs, averaged over steps."""
    denoiser = fp_pipe.transformer
    errors = []

    def compare(module, args, kwargs, output):
        fp_out, q_out = denoiser_output(output), denoiser_output(quantized_denoiser(*args, **kwargs))
        errors.append(metrics.relative_mse(q_out.float(), fp_out.float()))

    handle = denoiser.register_forward_hook(compare, with_kwargs=True)
    try:
        generate(fp_pipe, prompts, seeds, **call)
    finally:
        handle.remove()
    return float(sum(errors) / len(errors))


def compare_samples(samples: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Fidelity of quantized samples to the FP samples from the same noise."""
    return {"psnr": metrics.psnr(samples, reference), "ssim": metrics.ssim(samples, reference)}


def _grid_image(rows: dict[str, torch.Tensor], scale: int):
    """One labelled row per variant (images in [-1, 1], `[N, C, H, W]`), same column = same seed."""
    from PIL import Image, ImageDraw

    label_width = 8 * max(len(name) for name in rows) + 8
    n, _, h, w = next(iter(rows.values())).shape
    h, w = h * scale, w * scale
    grid = Image.new("RGB", (label_width + n * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, samples) in enumerate(rows.items()):
        top = r * (h + 2)
        draw.text((4, top + h // 2 - 5), name, fill="black")
        pixels = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for c, image in enumerate(pixels):
            tile = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).resize((w, h), Image.NEAREST)
            grid.paste(tile, (label_width + c * (w + 2), top))
    return grid


def save_grid(rows: dict[str, torch.Tensor], path: str, scale: int = 2) -> None:
    """A PNG with one labelled row per variant (samples in [-1, 1], `[N, C, H, W]`), same column = same seed."""
    _grid_image(rows, scale).save(path)


def save_video_grid(rows: dict[str, torch.Tensor], path: str, scale: int = 2, frame_ms: int = 150) -> None:
    """An animated GIF of the same grid for videos (`[N, F, C, H, W]` in [-1, 1]), looping forever."""
    frames = [_grid_image({name: clips[:, f] for name, clips in rows.items()}, scale)
              for f in range(next(iter(rows.values())).shape[1])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
