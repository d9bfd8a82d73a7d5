"""viditq_diffusers.metrics against hand-computed values."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from viditq_diffusers.metrics import (accuracy, direction_of, estimate_motion, frechet_distance,
                                      frechet_distance_from_stats, psnr, relative_mse, ssim, temporal_consistency)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


# ------------------------------------------------------------------------------------------------ PSNR


# torchmetrics keeps data_range as a float32 scalar: PSNR matches the formula to ~1e-6 dB, not 1e-12
def test_psnr_constant_offset():
    ref = rand(2, 3, 8, 8)
    assert psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(2.0**2 / 0.01), abs=1e-5)  # 26.02 dB
    assert psnr(ref + 0.1, ref, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.01), abs=1e-5)


def test_psnr_is_per_sample_mean():
    ref = rand(2, 1, 8, 8)
    x = ref + torch.tensor([0.1, 0.2], dtype=torch.float64)[:, None, None, None]
    per = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]
    assert psnr(x, ref) == pytest.approx(sum(per) / 2, abs=1e-5)  # not 10 log10(4 / 0.025)
    assert torch.allclose(psnr(x, ref, reduction="none"), torch.tensor(per, dtype=torch.float64), atol=1e-5)


def test_psnr_identical_is_capped_or_inf():
    ref = rand(2, 3, 8, 8)
    assert psnr(ref, ref) == 100.0
    assert psnr(ref, ref, max_db=None) == math.inf
    x = ref.clone()
    x[1] += 0.1  # one exact sample does not make the mean inf
    assert psnr(x, ref) == pytest.approx((100 + 10 * math.log10(400)) / 2)


def test_psnr_video_folds_frames():
    ref = rand(2, 3, 1, 8, 8)
    x = ref + 0.1 * torch.arange(1, 4, dtype=torch.float64)[None, :, None, None, None]  # per-frame offsets
    per_frame = [10 * math.log10(4 / (0.1 * f) ** 2) for f in (1, 2, 3)]
    assert torch.allclose(psnr(x, ref, reduction="none"), torch.full((2,), sum(per_frame) / 3, dtype=torch.float64),
                          atol=1e-5)


# ------------------------------------------------------------------------------------------------ SSIM


def test_ssim_identical_is_one():
    ref = rand(2, 3, 16, 16)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert ssim(ref[None].repeat(2, 1, 1, 1, 1), ref[None].repeat(2, 1, 1, 1, 1)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_constant_images():
    # constant a vs b: no variance, SSIM = luminance term (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * L)^2
    a, b, c1 = 0.5, -0.25, (0.01 * 2.0) ** 2
    x, ref = torch.full((1, 1, 12, 12), a, dtype=torch.float64), torch.full((1, 1, 12, 12), b, dtype=torch.float64)
    assert ssim(x, ref) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-9)


def test_ssim_matches_gaussian_window_formula():
    # independent SSIM: scipy Gaussian filter (sigma 1.5, radius 5, torch-style reflect == scipy "mirror")
    x, ref = rand(1, 1, 16, 16, seed=1), rand(1, 1, 16, 16, seed=2)
    x = 0.7 * ref + 0.3 * x
    f = lambda im: scipy.ndimage.gaussian_filter(im, 1.5, mode="mirror", truncate=3.5)  # noqa: E731
    p, t = x[0, 0].numpy(), ref[0, 0].numpy()
    mp, mt = f(p), f(t)
    vp, vt, cov = np.maximum(f(p * p) - mp**2, 0), np.maximum(f(t * t) - mt**2, 0), f(p * t) - mp * mt
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = ((2 * mp * mt + c1) * (2 * cov + c2) / ((mp**2 + mt**2 + c1) * (vp + vt + c2))).mean()
    assert ssim(x, ref) == pytest.approx(float(expected), abs=1e-9)
    assert 0 < ssim(x, ref) < 1


# ----------------------------------------------------------------------------------------- relative MSE, accuracy


def test_relative_mse():
    ref = torch.ones(2, 4, dtype=torch.float64)
    x = ref * torch.tensor([[1.1], [1.2]], dtype=torch.float64)  # 0.01 and 0.04
    assert relative_mse(x, ref) == pytest.approx(0.025)
    assert relative_mse(ref, ref) == 0.0
    assert relative_mse(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])) == pytest.approx((9 + 4) / 4)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)  # predictions


# ------------------------------------------------------------------------------------------------ Frechet distance


def test_fd_of_gaussians_diagonal():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    # ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2 = 5 + (1 + 1 + 0)
    assert frechet_distance_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(7.0, abs=1e-10)


def test_fd_of_gaussians_full_cov_vs_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2, mu1, mu2 = a @ a.T, b @ b.T + 0.1 * torch.eye(6, dtype=torch.float64), a[0], b[0]
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_of_feature_sets():
    feats = rand(64, 8)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([1.0, -2.0] + [0.0] * 6, dtype=torch.float64)
    assert frechet_distance(feats, feats + shift) == pytest.approx(5.0, abs=1e-8)  # same cov: ||shift||^2
    small = rand(5, 32)  # N < D: rank-deficient covariances stay stable
    assert frechet_distance(small, small + shift.repeat(4)) == pytest.approx(20.0, abs=1e-8)
    assert frechet_distance(feats, rand(64, 8, seed=1)) > 0


# ------------------------------------------------------------------------------------------------ video


def moving_square(dx, dy, frames=5, size=32, side=6, start=(13, 13)):
    """[1, F, 1, H, W] video in [-1, 1]: a white square moving (dx, dy) px per frame on black."""
    video = -torch.ones(1, frames, 1, size, size, dtype=torch.float64)
    for f in range(frames):
        y, x = start[0] + f * dy, start[1] + f * dx
        video[0, f, 0, y:y + side, x:x + side] = 1.0
    return video


@pytest.mark.parametrize("dx,dy,name", [(-2, 0, "left"), (2, 0, "right"), (0, -2, "up"), (0, 1, "down")])
def test_motion_direction(dx, dy, name):
    mx, my = estimate_motion(moving_square(dx, dy))
    assert (mx.item(), my.item()) == (dx, dy)
    assert direction_of(mx.item(), my.item()) == name


def test_direction_of_static_and_diagonal():
    assert direction_of(0.0, 0.1) == "none"
    assert direction_of(-1.5, 1.0) == "left" and direction_of(0.5, -2.0) == "up"


def test_warp_error():
    clip = moving_square(-2, 0)
    assert temporal_consistency(clip) == 0.0  # pure shift: perfectly consistent
    noisy = clip + 0.1 * rand(*clip.shape, seed=3)
    assert temporal_consistency(noisy) > 1e-3
    per_clip = temporal_consistency(torch.cat([clip, noisy]), reduction="none")
    assert per_clip.shape == (2,) and per_clip[0] == 0 and per_clip[1] > 0
    assert temporal_consistency(rand(1, 4, 3, 16, 16)) > 0.5  # unrelated frames
