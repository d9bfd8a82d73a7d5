"""Video data for the text-to-video reference pipeline: a ``load_digits`` digit moving in a named direction.

Each clip is ``FRAMES`` (8) frames of 32x32. The digit is the same 24x24 upsampled ``load_digits`` glyph as in
``reference.data`` (plain style), with a random zoom (0.9..1.1) and a slight shear, and it translates rigidly
by ``SPEED`` (1.5) px per frame in one of four directions. The path is centred on the canvas (frame 0 starts
5.25 px before the centre) with +-1 px of random offset along and across the path. Prompts:

    "a handwritten digit 3 moving left"      (directions: left, right, up, down; image axes, y down)

Clips are ``(N, F, 3, 32, 32)`` in [-1, 1]. ``split`` is ``reference.data``'s fixed train/test split.

    python -m reference.video_data [grid.png]   # prints shapes and prompts; optionally saves first/last frames
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.data import DIGITS, _base

FRAMES = 8
SPEED = 1.5  # pixels per frame
DIRECTIONS = ("left", "right", "up", "down")
UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down


def video_prompt_for(digit: int, direction: str) -> str:
    if direction not in UNIT:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return f"a handwritten digit {digit} moving {direction}"


def all_video_prompts() -> list[str]:
    """Every prompt the video data uses (10 digits x 4 directions), digit-major."""
    return [video_prompt_for(d, m) for d in DIGITS for m in DIRECTIONS]


def render_clips(x: torch.Tensor, directions: list[str], g: torch.Generator, frames: int = FRAMES,
                 speed: float = SPEED) -> torch.Tensor:
    """Move base images (N,1,32,32 in [0,1]) along ``directions``; returns (N, F, 3, 32, 32) in [-1, 1]."""
    n, _, h, w = x.shape
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    s = 1.0 / u(0.9, 1.1)                        # grid scale is the inverse of the image zoom
    shear = 0.1 * (torch.rand(n, generator=g) - 0.5)
    along, across = u(-1.0, 1.0), u(-1.0, 1.0)
    unit = torch.tensor([UNIT[d] for d in directions])            # (N, 2)
    perp = unit.flip(1).abs()                                      # the other axis
    offsets = torch.arange(frames, dtype=torch.float32) - (frames - 1) / 2
    # displacement of the content in px per clip and frame: (N, F, 2)
    disp = (unit[:, None] * (offsets[None, :, None] * speed + along[:, None, None])
            + perp[:, None] * across[:, None, None])
    # affine_grid samples the input at s * x + t (normalised coords, 2 / size per px): content moves by -t / s
    theta = torch.zeros(n, frames, 2, 3)
    theta[..., 0, 0], theta[..., 0, 1], theta[..., 1, 1] = s[:, None], (s * shear)[:, None], s[:, None]
    theta[..., 0, 2] = -s[:, None] * disp[..., 0] * 2 / w
    theta[..., 1, 2] = -s[:, None] * disp[..., 1] * 2 / h
    src = x[:, None].expand(-1, frames, -1, -1, -1).reshape(n * frames, 1, h, w)
    grid = F.affine_grid(theta.reshape(n * frames, 2, 3), [n * frames, 1, h, w], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out * 2 - 1).reshape(n, frames, 1, h, w).expand(-1, -1, 3, -1, -1).contiguous()


def sample_clips(generator: torch.Generator, n: int, split: str = "train", frames: int = FRAMES
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """A seeded random batch: (clips (n, F, 3, 32, 32) in [-1, 1], digits (n,), directions, prompts)."""
    x, y = _base(split)
    idx = torch.randint(len(y), (n,), generator=generator)
    dirs = [DIRECTIONS[i] for i in torch.randint(len(DIRECTIONS), (n,), generator=generator).tolist()]
    clips = render_clips(x[idx], dirs, generator, frames)
    digits = y[idx]
    return clips, digits, dirs, [video_prompt_for(int(d), m) for d, m in zip(digits, dirs)]


def recentre(frames: torch.Tensor) -> torch.Tensor:
    """Shift each frame (N, 3, H, W in [-1, 1]) so the intensity centroid of its digit sits at the centre
    (bilinear, zeros outside): the digit classifier was trained on centred digits (+-2 px)."""
    n, _, h, w = frames.shape
    m = ((frames.mean(1) + 1) / 2).clamp(min=0)                   # (N, H, W) in [0, 1]
    total = m.sum((1, 2)).clamp_min(1e-6)
    ys, xs = torch.arange(h, dtype=frames.dtype), torch.arange(w, dtype=frames.dtype)
    cx = (m.sum(1) * xs).sum(1) / total - (w - 1) / 2
    cy = (m.sum(2) * ys).sum(1) / total - (h - 1) / 2
    theta = torch.zeros(n, 2, 3, dtype=frames.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = cx * 2 / w, cy * 2 / h
    grid = F.affine_grid(theta, list(frames.shape), align_corners=False)
    return F.grid_sample(frames + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


if __name__ == "__main__":
    import sys

    from reference.data import save_grid

    clips, digits, dirs, prompts = sample_clips(torch.Generator().manual_seed(0), 10)
    print(clips.shape, prompts[:3])
    if len(sys.argv) > 1:
        save_grid(clips.reshape(-1, 3, 32, 32), sys.argv[1], nrow=FRAMES)
