"""Hadamard matrices and the seeded rotation: exact orthogonality, fast path == dense."""

import math

import pytest
import torch

from viditq_diffusers.quant.hadamard import hadamard_matrix, random_signs, rotate, rotate_kernel_order, rotation_matrix

SMALL_ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 44, 60, 64, 96, 128, 144, 192, 256, 384, 768, 1152]
# Too big for a full n^3 check within the time budget; see test_large_orders_are_hadamard.
LARGE_ORDERS = [2048, 3072, 4608, 5120]


@pytest.mark.parametrize("n", SMALL_ORDERS)
def test_small_orders_are_hadamard(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones_like(h))
    # Integer entries and sums <= n: float64 products are exact.
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", LARGE_ORDERS)
def test_large_orders_are_hadamard(n):
    h = hadamard_matrix(n)
    assert h.abs().eq(1).all()
    # Freivalds: if H H^T != n I, a random +-1 vector passes with probability <= 1/2;
    # 16 of them make a false pass ~2^-16. Exact in float64 (integers below 2^53).
    gen = torch.Generator().manual_seed(0)
    v = torch.randint(0, 2, (n, 16), generator=gen).double() * 2 - 1
    assert torch.equal(h @ (h.T @ v), n * v)
    # And some rows exactly, from the first and last dense blocks.
    rows = torch.cat((torch.arange(16), torch.arange(n - 16, n)))
    expected = torch.zeros(len(rows), n, dtype=torch.float64)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(h[rows] @ h.T, expected)


def test_kronecker_ordering():
    # H_96 = H_12 kron H_8: channel i = a * 8 + b.
    assert torch.equal(hadamard_matrix(96), torch.kron(hadamard_matrix(12), hadamard_matrix(8)))
    assert torch.equal(hadamard_matrix(1152), torch.kron(hadamard_matrix(36), hadamard_matrix(32)))


def test_dtype_and_copy():
    h = hadamard_matrix(12, dtype=torch.float16)
    assert h.dtype == torch.float16
    h.zero_()  # must not poison the cache
    assert torch.equal(hadamard_matrix(12).abs(), torch.ones(12, 12, dtype=torch.float64))
    s = random_signs(8, 0)
    s.zero_()
    assert random_signs(8, 0).abs().min() == 1


@pytest.mark.parametrize("n", [0, 6, 7, 18, 92, 1001])
def test_impossible_orders_raise(n):
    with pytest.raises(ValueError, match=f"in_features={n} has no known Hadamard|positive"):
        hadamard_matrix(n)
    if n:
        with pytest.raises(ValueError, match="balance='smooth'"):
            rotate(torch.zeros(2, n), seed=0)


def test_random_signs_deterministic():
    s = random_signs(4096, 7)
    assert s.dtype == torch.float64 and set(s.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_signs(4096, 7))
    assert not torch.equal(s, random_signs(4096, 8))
    # Pinned: seeds are stored with checkpoints, so the draws must never change.
    assert random_signs(16, 0).tolist() == [-1, 1, 1, -1, 1, 1, 1, 1, 1, 1, 1, -1, -1, 1, -1, -1]
    # Independent of the global RNG state.
    torch.manual_seed(123)
    assert torch.equal(random_signs(4096, 7), s)


@pytest.mark.parametrize("n", [8, 12, 96, 128, 1152])
def test_rotation_matrix_orthogonal_and_seeded(n):
    r = rotation_matrix(n, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r, rotation_matrix(n, seed=3))
    assert not torch.equal(r, rotation_matrix(n, seed=4))
    expected = random_signs(n, 3)[:, None] * hadamard_matrix(n) / math.sqrt(n)
    assert torch.equal(r, expected)


@pytest.mark.parametrize("n", [8, 12, 96, 128, 1152])
def test_rotate_matches_dense(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = rotate(x, seed=11)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.allclose(y, x @ rotation_matrix(n, seed=11), rtol=0, atol=1e-12)


def test_rotate_shapes_and_noncontiguous():
    r = rotation_matrix(96, seed=1)
    v = torch.randn(96, dtype=torch.float64)
    assert torch.allclose(rotate(v, 1), v @ r, rtol=0, atol=1e-12)
    xt = torch.randn(96, 7, dtype=torch.float64).T  # non-contiguous [7, 96]
    assert torch.allclose(rotate(xt, 1), xt @ r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_rotate_low_precision(dtype, tol):
    x = torch.randn(4, 384, generator=torch.Generator().manual_seed(0)) * 100
    y = rotate(x.to(dtype), seed=5)
    assert y.dtype == dtype
    ref = x.double() @ rotation_matrix(384, seed=5)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotate_kernel_order_is_rotate_for_powers_of_two(dtype):
    """No dense factor: the fused kernel's order is the FWHT of `rotate`, bit for bit."""
    x = (torch.randn(6, 256, generator=torch.Generator().manual_seed(1)) * 10).to(dtype)
    assert torch.equal(rotate_kernel_order(x, 4), rotate(x, 4))


@pytest.mark.parametrize("n", [12, 96, 1152])
def test_rotate_kernel_order_matches_dense(n):
    """With a dense factor the order of the sums changes, the rotation does not."""
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(rotate_kernel_order(x, 7), x @ rotation_matrix(n, seed=7), rtol=0, atol=1e-12)
    y = rotate_kernel_order(x.float(), 7)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), x @ rotation_matrix(n, seed=7), rtol=0, atol=1e-5)
