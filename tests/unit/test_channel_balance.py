"""Channel balancing: smoothing factors by formula, function preserving before quantization."""

import math

import pytest
import torch
import torch.nn.functional as F

from viditq_diffusers.quant.channel_balance import (balance_activation, balance_activation_kernel_order, balance_weight,
                                                    smoothing_factors)


def _layer(n_in, n_out=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, n_in, dtype=torch.float64, generator=gen)
    x[..., [1, n_in // 2]] *= 200.0  # channel outliers, as in DiT activations
    w = torch.randn(n_out, n_in, dtype=torch.float64, generator=gen)
    b = torch.randn(n_out, dtype=torch.float64, generator=gen)
    return x, w, b


@pytest.mark.parametrize("n_in", [96, 128, 1152])
@pytest.mark.parametrize("mode", ["smooth", "rotate", "both"])
def test_balancing_preserves_the_function(n_in, mode):
    x, w, b = _layer(n_in)
    m = smoothing_factors(x.abs().amax(dim=(0, 1)), w, alpha=0.5) if mode != "rotate" else None
    seed = 17 if mode != "smooth" else None
    y = F.linear(x, w, b)
    y_balanced = F.linear(balance_activation(x, m, seed), balance_weight(w, m, seed), b)
    assert ((y_balanced - y).abs().max() / y.abs().max()).item() <= 1e-10


def test_smoothing_flattens_activation_channels():
    x, w, _ = _layer(128)
    a = x.abs().amax(dim=(0, 1))
    m = smoothing_factors(a, w, alpha=0.5)
    # Balanced maxima: activation a_j m_j and weight w_j / m_j both become sqrt(a_j w_j).
    wmax = w.abs().amax(dim=0)
    assert torch.allclose(a * m, (a * wmax).sqrt(), rtol=1e-12)
    assert torch.allclose(balance_weight(w, m, None).abs().amax(dim=0), (a * wmax).sqrt(), rtol=1e-12)
    ratio = lambda t: (t.max() / t.min()).item()  # noqa: E731
    assert ratio(balance_activation(x, m, None).abs().amax(dim=(0, 1))) < ratio(a) / 10


def test_smoothing_factors_hand_example():
    act = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)  # the zero channel is clamped to 1e-3
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 0.0]], dtype=torch.float64)  # w_j = 3, 2, 0.5
    m = smoothing_factors(act, w, alpha=0.5)
    expected = [math.sqrt(3) / 2, math.sqrt(2), math.sqrt(0.5 / 1e-3)]
    assert torch.allclose(m, torch.tensor(expected, dtype=torch.float64), rtol=1e-14)
    # alpha=0: m = 1 / a (activations to 1); alpha=1: m = w (weights to 1).
    assert torch.allclose(smoothing_factors(act, w, 0.0), torch.tensor([0.25, 1.0, 1000.0], dtype=torch.float64))
    assert torch.allclose(smoothing_factors(act, w, 1.0), torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64))


def test_smoothing_factors_clamps_and_dtype():
    act = torch.tensor([0.0, 2.0])
    w = torch.tensor([[0.0, 1.0]])  # all-zero weight channel: w_j clamped at eps too
    m = smoothing_factors(act, w, alpha=0.3)
    assert m.dtype == torch.float32 and torch.isfinite(m).all()
    assert m[0].item() == pytest.approx(1e-3 ** 0.3 / 1e-3 ** 0.7)
    assert m[1].item() == pytest.approx(1.0 / 2.0 ** 0.7)
    assert smoothing_factors(act, w, 0.5, eps=0.1)[0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_smoothing_factors_rejects_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(torch.ones(3), torch.ones(2, 3), alpha)


@pytest.mark.parametrize(
    "act,match", [([1.0, float("nan"), 1.0], "NaN"), ([1.0, -1.0, 1.0], "negative"), ([1.0, 1.0], r"\[in\]")]
)
def test_smoothing_factors_rejects_bad_stats(act, match):
    with pytest.raises(ValueError, match=match):
        smoothing_factors(torch.tensor(act), torch.ones(2, 3), 0.5)


def test_dtypes_preserved():
    x, w, _ = _layer(96)
    m = smoothing_factors(x.abs().amax(dim=(0, 1)).float(), w.float(), 0.5)
    assert balance_weight(w.half(), m, 3).dtype == torch.float16
    assert balance_activation(x.bfloat16(), m, 3).dtype == torch.bfloat16
    assert torch.equal(balance_activation(x, None, None), x)
    with pytest.raises(ValueError, match="expected"):
        balance_activation(x, m[:10], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_order_is_balance_activation_up_to_rounding(dtype):
    """What every quantized linear route computes (`balance_activation_kernel_order`): `balance_activation` bit for
    bit where the width is a power of two (no dense Hadamard factor), within float rounding otherwise."""
    for n in (128, 1152):
        x, w, _ = _layer(n)
        m = smoothing_factors(x.abs().amax(dim=(0, 1)), w, alpha=0.5).float()
        x = x.to(dtype)
        ours, theirs = balance_activation_kernel_order(x, m, 5), balance_activation(x, m, 5)
        if n == 128:
            assert torch.equal(ours, theirs)
        else:
            exact = balance_activation(x.double(), m, 5)
            tol = 4 * torch.finfo(dtype).eps * exact.abs().max()
            assert (ours.double() - exact).abs().max() <= tol and (theirs.double() - exact).abs().max() <= tol
    with pytest.raises(ValueError, match="one per input channel"):
        balance_activation_kernel_order(torch.zeros(2, 64), torch.ones(63), 0)
