"""Quality metrics for comparing quantized against full-precision (FP) diffusion outputs.

Pure functions over tensors (no models, no I/O); the benchmark harness feeds them samples and features.

* fidelity: :func:`psnr`, :func:`ssim` (via ``torchmetrics.functional``), :func:`relative_mse`;
* visual quality: :func:`frechet_distance` between two feature sets (closed form, float64);
* text alignment: :func:`accuracy` of a classifier;
* video: :func:`temporal_consistency` (frame-to-frame warp error after the best integer shift),
  :func:`estimate_motion` and :func:`direction_of` (direction of motion of a clip).

Conventions: images are ``[N, C, H, W]``, videos ``[N, F, C, H, W]``; pixel values are expected in
``[-1, 1]`` (so ``data_range=2.0``); pass ``data_range=1.0`` for ``[0, 1]`` images. Image metrics accept videos
by folding the frames into the batch and averaging the per-frame scores per clip. ``reduction="mean"`` returns
a Python float (mean over samples), ``reduction="none"`` a float64 tensor with one value per sample/clip.
Everything is computed in float64.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

__all__ = ["psnr", "ssim", "relative_mse", "frechet_distance", "frechet_distance_from_stats", "accuracy",
           "temporal_consistency", "estimate_motion", "direction_of"]


def _fold(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check shapes, fold ``[N, F, C, H, W]`` into ``[N*F, C, H, W]`` and cast to float64; returns N too."""
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected images [N, C, H, W] or videos [N, F, C, H, W], got {tuple(x.shape)}")
    n = x.shape[0]
    return x.reshape(-1, *x.shape[-3:]).double(), ref.reshape(-1, *ref.shape[-3:]).double(), n


def _reduce(per_item: torch.Tensor, n: int, reduction: str):
    """Average per-frame scores per clip (``[N*F] -> [N]``), then reduce over the batch."""
    per_sample = per_item.reshape(n, -1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return float(per_sample.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, max_db: float | None = 100.0,
         reduction: str = "mean"):
    """Peak signal-to-noise ratio of ``x`` against ``ref`` in dB: ``10 log10(data_range^2 / MSE)``.

    PSNR is computed PER SAMPLE (per frame for videos, then averaged per clip) and then averaged over the
    batch; this differs from the PSNR of the pooled MSE (log of a mean != mean of logs).
    Identical samples have MSE 0 and PSNR +inf: each per-sample value is capped at ``max_db`` (default 100 dB,
    far above any quantization result, so one exact sample cannot turn the batch mean into inf). Pass
    ``max_db=None`` to keep inf. (torchmetrics holds ``data_range`` as a float32 scalar, so values match the
    formula to ~1e-6 dB.)
    """
    x, ref, n = _fold(x, ref)
    per = peak_signal_noise_ratio(x, ref, data_range=data_range, reduction="none", dim=(1, 2, 3))
    if max_db is not None:
        per = per.clamp(max=max_db)
    return _reduce(per, n, reduction)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5, reduction: str = "mean"):
    """Structural similarity (torchmetrics' Gaussian-window SSIM: sigma 1.5, window 11, k1 0.01, k2 0.03,
    reflect padding, mean over channels and pixels), per sample (per frame, averaged per clip), then averaged.
    Identical inputs give exactly 1. Frames must be larger than 5 px on each side (the reflect padding)."""
    x, ref, n = _fold(x, ref)
    per = structural_similarity_index_measure(x, ref, sigma=sigma, data_range=data_range, reduction="none")
    return _reduce(per, n, reduction)


def relative_mse(x: torch.Tensor, ref: torch.Tensor, reduction: str = "mean"):
    """Relative squared error ``||x - ref||^2 / ||ref||^2`` per sample (over all non-batch dims), then averaged.

    Meant for epsilon predictions of a quantized vs the FP transformer. A zero ``ref`` sample gives inf (or 0 if
    ``x`` is zero too)."""
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(ref.shape)}")
    x, ref = x.reshape(x.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
    num, den = (x - ref).square().sum(1), ref.square().sum(1)
    per = torch.where(num == 0, torch.zeros_like(num), num / den)
    return _reduce(per, x.shape[0], reduction)


def _psd_eigvals(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off zeros (|w| <= n * eps * max w, incl. negatives) set to 0."""
    tol = w.max().clamp(min=0) * w.numel() * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via eigh (round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * _psd_eigvals(w).sqrt()) @ v.T


def frechet_distance_from_stats(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                                sigma2: torch.Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    ``Tr((S1 S2)^(1/2))`` is evaluated as ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` (a similar, symmetric PSD
    matrix) with ``eigh`` in float64: unlike ``eig(S1 S2)`` or ``sqrtm`` of the non-symmetric product, this
    stays real and stable for the rank-deficient covariances of small sample sets (N < feature dim);
    eigenvalues at round-off level are zeroed (their square roots would add ~1e-8 each). A tiny negative
    total is clamped to 0."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    s1_half = _sqrtm_psd(sigma1)
    m = s1_half @ sigma2 @ s1_half
    tr_covmean = _psd_eigvals(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance (the FID formula) between two feature sets ``[N_a, D]`` and ``[N_b, D]``: the Gaussians
    fitted by sample mean and unbiased covariance (``N - 1``), see :func:`frechet_distance_from_stats`.

    Closed form rather than ``torchmetrics``' ``FrechetInceptionDistance(feature=module)``: that metric takes
    images and runs the extractor itself (probing it with a dummy 3x299x299 input unless it has
    ``num_features``), while the harness already holds classifier features; the formula is the same."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"expected [N, D] feature sets, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if min(len(feats_a), len(feats_b)) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    a, b = feats_a.double(), feats_b.double()
    return frechet_distance_from_stats(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                                       b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose predicted class equals ``labels``. ``logits`` is ``[N, num_classes]`` (argmax
    is taken) or already ``[N]`` integer predictions."""
    pred = logits.argmax(-1) if logits.ndim == 2 else logits
    if pred.shape != labels.shape:
        raise ValueError(f"shape mismatch: predictions {tuple(pred.shape)} vs labels {tuple(labels.shape)}")
    return float((pred == labels).double().mean())


# ------------------------------------------------------------------------------------------------ video


def _candidate_shifts(max_shift: int) -> list[tuple[int, int]]:
    """All integer (dx, dy) in the window, smallest |dx|+|dy| first: on ties argmin picks the smallest shift."""
    r = range(-max_shift, max_shift + 1)
    return sorted(((dx, dy) for dy in r for dx in r), key=lambda s: (abs(s[0]) + abs(s[1]), s[1], s[0]))


def _pair_shifts(video: torch.Tensor, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every consecutive frame pair, the shift minimising the warp error and that error.

    Content moving by (dx, dy) means ``next[y, x] = prev[y - dy, x - dx]``; the error of a candidate is the MSE
    between both over their overlap (no wrap-around). Returns shifts ``[N, F-1, 2]`` (dx, dy) and errors
    ``[N, F-1]``."""
    if video.ndim != 5 or video.shape[1] < 2:
        raise ValueError(f"expected a video [N, F>=2, C, H, W], got {tuple(video.shape)}")
    h, w = video.shape[-2:]
    if not 0 <= max_shift < min(h, w):
        raise ValueError(f"max_shift must be in [0, {min(h, w)}), got {max_shift}")
    v = video.double()
    prev, nxt = v[:, :-1], v[:, 1:]
    cands = _candidate_shifts(max_shift)
    errs = []
    for dx, dy in cands:
        a = nxt[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
        b = prev[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
        errs.append((a - b).square().mean((-3, -2, -1)))
    errs = torch.stack(errs, -1)  # [N, F-1, n_cands]
    best = errs.argmin(-1)
    shifts = torch.tensor(cands, dtype=torch.float64)[best]
    return shifts, errs.gather(-1, best[..., None])[..., 0]


def temporal_consistency(video: torch.Tensor, max_shift: int = 4, reduction: str = "mean"):
    """Warp error of a video ``[N, F, C, H, W]``: for each consecutive frame pair find the integer shift
    (|dx|, |dy| <= ``max_shift``) that best aligns them, warp, and take the MSE over the overlap; averaged over
    pairs (per clip) and clips. LOWER = more consistent: 0 for content that only translates rigidly.
    Compare a quantized video's score with the FP one's."""
    _, err = _pair_shifts(video, max_shift)
    return _reduce(err, video.shape[0], reduction)


def estimate_motion(video: torch.Tensor, max_shift: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-frame motion ``(dx, dy)`` of each clip of ``[N, F, C, H, W]``, two float64 tensors ``[N]``,
    in pixels per frame. Image convention: x grows to the right, y grows DOWN (row index), so ``dx < 0`` is
    "left", ``dx > 0`` "right", ``dy < 0`` "up", ``dy > 0`` "down"."""
    shifts, _ = _pair_shifts(video, max_shift)
    mean = shifts.mean(1)
    return mean[:, 0], mean[:, 1]


def direction_of(dx: float, dy: float, min_motion: float = 0.5) -> str:
    """Dominant direction of a motion (see :func:`estimate_motion` for the sign convention): "left", "right",
    "up" or "down" along the axis with the larger magnitude (x on a tie), or "none" if both magnitudes are
    below ``min_motion`` pixels/frame (a static clip matches no requested direction)."""
    dx, dy = float(dx), float(dy)
    if math.isnan(dx) or math.isnan(dy) or max(abs(dx), abs(dy)) < min_motion:
        return "none"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "up" if dy < 0 else "down"
