"""Digit data for the reference pipelines: scikit-learn's ``load_digits``, upsampled and augmented.

``load_digits`` ships with scikit-learn (1797 grey 8x8 digits, values 0..16; no download). Each digit is
upsampled bilinearly to 24x24 and centred on a 32x32 black canvas, then augmented on the fly with a seeded
random affine (scale 0.9..1.1, shift +-2 px, slight shear) and one of five styles that the prompt names:

    plain   "a handwritten digit 7"          (no change)
    thick   "a thick handwritten digit 7"    (3x3 dilation)
    thin    "a thin handwritten digit 7"     (3x3 erosion, contrast re-stretched)
    faint   "a faint handwritten digit 7"    (intensity x 0.4)
    italic  "an italic handwritten digit 7"  (shear 0.35: slanted to the right)

Images are 3x32x32 (grey replicated), white digit on black, in [-1, 1]. A fixed split holds out every 5th
index of ``load_digits`` (360 images) for testing the classifier: ``split="train"|"test"|"all"``.

    python -m reference.data [grid.png]   # prints a batch's shape and prompts; optionally saves a grid
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

STYLES = ("plain", "thick", "thin", "faint", "italic")
DIGITS = tuple(range(10))
PROMPT_WORDS = ("a", "an", "handwritten", "digit") + STYLES[1:] + tuple(str(d) for d in DIGITS)


def prompt_for(digit: int, style: str) -> str:
    """The prompt for ``digit`` drawn in ``style`` ("plain" adds no style word)."""
    if style == "plain":
        return f"a handwritten digit {digit}"
    article = "an" if style[0] in "aeiou" else "a"
    return f"{article} {style} handwritten digit {digit}"


def all_prompts() -> list[str]:
    """Every prompt the data set uses (10 digits x 5 styles), digit-major."""
    return [prompt_for(d, s) for d in DIGITS for s in STYLES]


@functools.lru_cache(maxsize=None)
def _base(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,1,32,32) in [0,1], labels (N,)) for ``split``: 24x24 digit centred on a 32x32 canvas."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y))
    keep = {"train": idx % 5 != 0, "test": idx % 5 == 0, "all": idx >= 0}[split]
    x = F.interpolate(x[keep], size=(24, 24), mode="bilinear", align_corners=False)
    return F.pad(x, (4, 4, 4, 4)).clamp(0, 1), y[keep]


def _affine(x: torch.Tensor, g: torch.Generator, shear: torch.Tensor) -> torch.Tensor:
    """Random scale/shift plus the given per-sample shear, via ``grid_sample`` (zeros outside)."""
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    s = 1.0 / u(0.9, 1.1)                         # grid scale is the inverse of the image zoom
    tx, ty = u(-0.125, 0.125), u(-0.125, 0.125)   # +-2 px in normalised coords (32 px = 2.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = s, s * shear, tx
    theta[:, 1, 1], theta[:, 1, 2] = s, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def render(x: torch.Tensor, styles: list[str], g: torch.Generator) -> torch.Tensor:
    """Augment base images (N,1,32,32 in [0,1]) in the given styles; returns (N,3,32,32) in [-1,1]."""
    n = x.shape[0]
    italic = torch.tensor([s == "italic" for s in styles])
    shear = torch.where(italic, torch.full((n,), 0.35), 0.1 * (torch.rand(n, generator=g) - 0.5))
    x = _affine(x, g, shear)
    out = x.clone()
    for i, s in enumerate(styles):
        if s == "thick":
            out[i] = F.max_pool2d(x[i : i + 1], 3, 1, 1)[0]
        elif s == "thin":
            e = -F.max_pool2d(-x[i : i + 1], 3, 1, 1)[0]
            out[i] = (e / e.amax().clamp_min(1e-3)).clamp(0, 1)
        elif s == "faint":
            out[i] = 0.4 * x[i]
    return (out * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def sample_batch(generator: torch.Generator, n: int, split: str = "train",
                 styles: tuple[str, ...] = STYLES) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """A seeded random batch: (images (n,3,32,32) in [-1,1], digits (n,), styles, prompts)."""
    x, y = _base(split)
    idx = torch.randint(len(y), (n,), generator=generator)
    st = [styles[i] for i in torch.randint(len(styles), (n,), generator=generator).tolist()]
    digits = y[idx]
    images = render(x[idx], st, generator)
    return images, digits, st, [prompt_for(int(d), s) for d, s in zip(digits, st)]


def save_grid(images: torch.Tensor, path: str, nrow: int = 10) -> None:
    """Save images (N,3,H,W) in [-1,1] as a PNG grid (uses PIL, which diffusers already needs)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.zeros(3, rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = images[i]
    arr = ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


if __name__ == "__main__":
    import sys

    g = torch.Generator().manual_seed(0)
    imgs, digits, styles, prompts = sample_batch(g, 50)
    print(imgs.shape, imgs.min().item(), imgs.max().item(), prompts[:3])
    if len(sys.argv) > 1:
        save_grid(imgs, sys.argv[1])
