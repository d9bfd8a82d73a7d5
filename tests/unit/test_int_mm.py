"""The CPU integer GEMM (`int_mm_exact_fp32`) is exact: bit-identical to an int64 reference, also at the
worst case that forces K to be split into chunks."""

import pytest
import torch

from viditq_diffusers.kernels.torch_ops import EXACT_FP32, int_mm, int_mm_exact_fp32


def reference(a, b):
    return (a.long() @ b.long().t()).to(torch.int32)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 63, 5), (33, 1152, 48), (16, 4608, 24)])
def test_random_codes_are_exact(m, k, n):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(int_mm(a, b), reference(a, b))


def test_worst_case_magnitudes_split_k_and_stay_exact():
    """All -128: every product is 2^14, so one fp32 GEMM over K = 4096 would sum to 2^26 and round; the
    chunks keep each fp32 sum <= 2^24."""
    k = 4096 + 3
    a = torch.full((3, k), -128, dtype=torch.int8)
    b = torch.full((2, k), -128, dtype=torch.int8)
    b[1, ::2] = 127
    out = int_mm_exact_fp32(a, b)
    assert torch.equal(out, reference(a, b))
    assert out[0, 0].item() == k * 2**14 > EXACT_FP32


def test_a_lone_minus_128_is_not_lost_by_int8_abs():
    """int8 abs(-128) wraps to -128; the bound must still see magnitude 128."""
    k = 1030
    a = torch.full((1, k), 1, dtype=torch.int8)
    a[0, 0] = -128
    b = torch.full((1, k), -128, dtype=torch.int8)
    assert torch.equal(int_mm_exact_fp32(a, b), reference(a, b))


def test_small_4bit_codes_take_one_chunk_and_empty_inputs_work():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 8192), generator=g, dtype=torch.int8)
    b = torch.randint(-8, 8, (4, 8192), generator=g, dtype=torch.int8)
    assert torch.equal(int_mm_exact_fp32(a, b), reference(a, b))
    assert int_mm_exact_fp32(torch.zeros(0, 8, dtype=torch.int8), b[:, :8]).shape == (0, 4)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 64), (4, False, 32), (8, False, 128), (8, True, 64)])
def test_grouped_fp32_route_gives_the_int32_bits(bits, symmetric, group):
    from viditq_diffusers.kernels.torch_ops import grouped_exact_fp32, int_mm_zero_point, quantize_activations
    from viditq_diffusers.quant.formats import quantize_weight

    g = torch.Generator().manual_seed(bits + group)
    x = torch.randn(37, 512, generator=g) * torch.rand(512, generator=g) * 4
    codes, scale, zero = quantize_weight(torch.randn(24, 512, generator=g) + 0.3, bits, group, symmetric, False)
    xq, _ = quantize_activations(x, 8)
    expected = None
    for i in range(512 // group):
        cols = slice(i * group, (i + 1) * group)
        acc = int_mm_zero_point(xq[:, cols], codes[:, cols], None if zero is None else zero[:, i])
        part = acc.to(torch.float32) * scale[:, i]
        expected = part if expected is None else expected + part
    assert torch.equal(grouped_exact_fp32(xq, codes, scale, zero), expected)
